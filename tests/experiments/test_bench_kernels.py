"""`mamba-jax bench kernels` at tiny sizes: the table's columns follow from the measured times and the
byte count (checked here from the shapes, independently), the roofline table knows the GPUs we use.
No timing is asserted (figures live in the README)."""
from __future__ import annotations

import json

import pytest

from experiments.bench_kernels import run
from mamba_jax.cli import main as cli_main


def test_min_bytes_counts_each_tensor_once():
    b, l, d, n = 2, 8, 4, 3
    got = run.min_bytes(b, l, d, n, itemsize=2)
    # forward: u, delta, z, y (b·l·d, 2 bytes) + B, C (b·l·n, 2 bytes) + A (d·n float32)
    assert got["fwd"] == 4 * (2 * 8 * 4 * 2) + 2 * (2 * 8 * 3 * 2) + 4 * 3 * 4
    # + backward: u, delta, z, B, C, A again and dy in; du, d_delta, dz, dB, dC, dA out (y is not re-read)
    backward = (3 + 1 + 3) * (2 * 8 * 4 * 2) + (2 + 2) * (2 * 8 * 3 * 2) + 2 * (4 * 3 * 4)
    assert got["fwd_bwd"] == got["fwd"] + backward


def test_peak_bandwidth_of_known_devices():
    assert run.peak_bandwidth("NVIDIA H100 80GB HBM3") == pytest.approx(3.35e12)
    assert run.peak_bandwidth("NVIDIA H200") == pytest.approx(4.8e12)
    assert run.peak_bandwidth("cpu") is None


def test_bench_kernels_tiny_table(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert cli_main(["bench", "kernels", "--kernel", "chunked", "--baselines", "reference", "--lengths", "16,24",
                     "--d", "8", "--n", "4", "--batch", "2", "--dtype", "float32", "--chunk-size", "8",
                     "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines()
            if line.startswith("| 16 |") or line.startswith("| 24 |")]
    assert [(r[0], r[1]) for r in rows] == [("16", "fwd"), ("16", "fwd+bwd"), ("24", "fwd"), ("24", "fwd+bwd")]
    for row in rows:
        times = data["results"][row[0]]
        phase = "fwd_s" if row[1] == "fwd" else "fwd_bwd_s"
        t_kernel, t_base = times["chunked"][phase], times["reference"][phase]
        assert float(row[2]) == pytest.approx(t_kernel * 1e3, rel=1e-2)
        need = run.min_bytes(2, int(row[0]), 8, 4, 4)["fwd" if row[1] == "fwd" else "fwd_bwd"]
        assert float(row[4]) == pytest.approx(need / t_kernel / 1e9, rel=1e-2)
        assert row[5] == "n/a"                                   # a CPU has no HBM roofline
        assert float(row[6]) == pytest.approx(t_base / t_kernel, rel=1e-2)


def test_ssd_min_bytes_counts_each_tensor_once():
    from experiments.bench_kernels import ssd as ssd_bench

    b, l, h, p, g, n = 2, 8, 3, 4, 1, 5
    got = ssd_bench.min_bytes(b, l, h, p, g, n, itemsize=2)
    big, small, dt, per_head = b * l * h * p * 2, b * l * g * n * 2, b * l * h * 4, h * 4
    # forward: x, z in and y out (b·l·h·p, 2 bytes); B, C (b·l·g·n); dt (float32); A, D, dt_bias (h, float32)
    assert got["fwd"] == 3 * big + 2 * small + dt + 3 * per_head
    # + backward: the inputs again and dy in; dx, dz, dB, dC, ddt, dA, dD, d dt_bias out
    assert got["fwd_bwd"] == got["fwd"] + (2 + 1 + 2) * big + 4 * small + 2 * dt + 6 * per_head


def test_bench_kernels_ssd_tiny_table(tmp_path, capsys):
    """--op ssd at a tiny size: chunked vs reference, the mamba_ssm baseline dropped with its reason on a
    host without it (torch with CUDA and mamba_ssm), the byte column from the SSD shapes."""
    from experiments.bench_kernels import ssd as ssd_bench

    out = tmp_path / "ssd.json"
    assert cli_main(["bench", "kernels", "--op", "ssd", "--kernel", "chunked", "--baselines", "reference,mamba_ssm",
                     "--lengths", "16", "--d", "8", "--head-dim", "4", "--n", "4", "--batch", "1", "--dtype",
                     "float32", "--chunk-size", "8", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    if ssd_bench.mamba_ssm_available() is not None:
        assert "skipping the mamba_ssm baseline" in printed
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("| 16 |")]
    assert [r[1] for r in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        phase = "fwd_s" if row[1] == "fwd" else "fwd_bwd_s"
        t = data["results"]["16"]["chunked"][phase]
        need = ssd_bench.min_bytes(1, 16, 2, 4, 1, 4, 4)["fwd" if row[1] == "fwd" else "fwd_bwd"]
        assert float(row[3]) == pytest.approx(need / 1e6, rel=1e-2, abs=1e-3)
        assert float(row[4]) == pytest.approx(need / t / 1e9, rel=1e-2)
        assert float(row[6]) == pytest.approx(data["results"]["16"]["reference"][phase] / t, rel=1e-2)
