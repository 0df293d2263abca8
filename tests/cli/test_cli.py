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
