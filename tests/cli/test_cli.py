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


TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


def test_freed_host_memory_is_kept_for_reuse_on_hosts_without_accelerators():
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    env = {}
    assert cli.reuse_freed_host_memory(env, device_nodes=[], mallopt=mallopt)
    # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD (malloc.h), and the same for child processes
    assert sorted(calls) == [(-8, 1), (-4, 0), (-1, 2**31 - 1)]
    assert env == {"GLIBC_TUNABLES": TUNABLES}
    env = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
    assert cli.reuse_freed_host_memory(env, device_nodes=[], mallopt=mallopt)
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + TUNABLES


@pytest.mark.parametrize("env, nodes, mallopt_answer, called", [
    ({}, ["/dev/nvidia0"], 1, False),
    ({}, ["/dev/accel0"], 1, False),
    ({"JAX_PLATFORMS": "cuda"}, [], 1, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, [], 1, False),   # the user's own malloc settings win
    ({}, [], 0, True),                                                 # mallopt refused: nothing is claimed
])
def test_freed_host_memory_policy_is_left_alone(env, nodes, mallopt_answer, called):
    calls = []
    before = dict(env)
    assert not cli.reuse_freed_host_memory(env, device_nodes=nodes,
                                           mallopt=lambda *args: calls.append(args) or mallopt_answer)
    assert env == before
    assert bool(calls) == called


_FAULTS_OF_A_SECOND_BLOCK = """
import ctypes, resource, sys
from mamba_jax import cli
if sys.argv[1] == "reuse":
    assert cli.reuse_freed_host_memory({}, device_nodes=[])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 100 * 2**20                 # as XLA's temporaries for one step: one block over glibc's mmap threshold
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) is what the policy tunes")
def test_a_freed_block_is_reused_without_page_faults():
    import os

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS_OF_A_SECOND_BLOCK, mode], env=env,
                                       capture_output=True, text=True, check=True).stdout)
              for mode in ("default", "reuse")}
    pages = 100 * 2**20 // 4096
    assert faults["default"] > pages // 2, faults     # glibc's default: a fresh mapping, faulted in again
    assert faults["reuse"] < pages // 20, faults      # the same pages again

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
