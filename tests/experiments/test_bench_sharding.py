"""Smoke test of `mamba-jax bench sharding` at tiny sizes: it re-runs itself in a subprocess with 4 fake
CPU devices, prints one table row per strategy plus the 1-device baseline, every number is positive and
finite, and the ratio column is tokens/s over the baseline's. No timing is asserted (timing claims live
in experiments/bench_sharding/README.md)."""
from __future__ import annotations

import math

import pytest

from mamba_jax.cli import main as cli_main

TINY = ["--devices", "4", "--steps", "2", "--batch", "4", "--seq-len", "16", "--d-model", "32", "--n-layer", "1",
        "--d-state", "4", "--vocab-size", "64"]
HEADER = "| run | devices | mesh | ms / step | tokens / s | ratio vs 1 device | loss |"


def _rows(printed: str):
    lines = printed.splitlines()
    start = lines.index(HEADER)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_sharding_tiny(capsys):
    # (the benchmark's subprocess keeps the caller's XLA_FLAGS, so conftest's unoptimised CPU code applies)
    assert cli_main(["bench", "sharding", *TINY]) == 0
    printed = capsys.readouterr().out
    rows = {row[0]: row for row in _rows(printed)}
    assert list(rows) == ["1 device", "dp", "fsdp", "tensor", "fsdp_tensor"]
    assert rows["1 device"][1:3] == ["1", "-"]
    assert {name: row[2] for name, row in rows.items() if name != "1 device"} == {
        "dp": "data=4", "fsdp": "fsdp=4", "tensor": "data=2, tensor=2", "fsdp_tensor": "fsdp=2, tensor=2"}
    base = float(rows["1 device"][4])
    for name, row in rows.items():
        ms, tokens_per_s, ratio, loss = (float(x) for x in row[3:7])
        assert all(math.isfinite(x) for x in (ms, tokens_per_s, ratio, loss)), row
        assert ms > 0 and tokens_per_s > 0 and ratio > 0, row
        assert ratio == pytest.approx(tokens_per_s / base, rel=1e-2), row   # ratio printed to 3 digits
        assert tokens_per_s == pytest.approx(4 * 16 / (ms / 1e3), rel=1e-2), row
    assert rows["1 device"][5] == "1"
    assert "fake CPU devices" in printed and "not speed-up" in printed


@pytest.mark.parametrize("argv,pattern", [
    (["--devices", "6", "--tensor", "4"], "--tensor"),
    (["--batch", "6"], "--batch"),
    (["--strategies", "zero3"], "--strategies"),
    (["--steps", "0"], "--steps"),
])
def test_bench_sharding_rejects_bad_options(argv, pattern, capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "sharding", *argv])
    assert pattern in capsys.readouterr().err
