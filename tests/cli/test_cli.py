"""The `mamba-jax` entry point dispatches to experiments and benchmarks."""
import subprocess
import sys

import pytest

from mamba_jax import cli


def test_unknown_experiment_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_scan_runs_and_prints_ratios(capsys):
    assert cli.main(["bench", "scan", "--lengths", "8", "--d", "4", "--n", "2", "--repeats", "1",
                     "--chunk-size", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 8 |")]
    assert {r.split("|")[2].strip() for r in rows} == {"reference", "associative", "chunked", "chunked_associative"}
    ref_row = next(r for r in rows if "| reference |" in r)
    assert ref_row.split("|")[4].strip() == "1"  # ratio of the reference to itself


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "mamba_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout and "bench" in out.stdout


def test_absent_tpu_is_skipped_only_without_accelerators_and_explicit_platforms():
    import importlib.util

    has_libtpu = importlib.util.find_spec("libtpu") is not None
    env = {}
    assert cli.skip_absent_tpu(env, device_nodes=[]) == has_libtpu
    assert env == ({"JAX_PLATFORMS": "cpu"} if has_libtpu else {})
    for nodes in (["/dev/accel0"], ["/dev/vfio/0"], ["/dev/nvidia0"]):
        env = {}
        assert not cli.skip_absent_tpu(env, device_nodes=nodes) and env == {}
    env = {"JAX_PLATFORMS": "tpu"}
    assert not cli.skip_absent_tpu(env, device_nodes=[]) and env == {"JAX_PLATFORMS": "tpu"}


def test_cli_on_a_host_without_accelerators_prints_no_libtpu_noise(tmp_path):
    import importlib.util
    import os

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("needs the optional dependency libtpu (the tpu-aot extra) to show its noise")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "mamba_jax.cli", "bench", "scan", "--lengths", "8", "--d", "4",
                          "--n", "2", "--repeats", "1", "--chunk-size", "4"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 8 | reference |" in out.stdout
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr
