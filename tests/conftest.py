"""Shared test set-up. Every test runs on CPU; float64 checks use `jax.enable_x64(True)` locally."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles thousands of small programs and runs most of them once or twice, so compile time
# dominates (measured: backend compilation is ~70% of the CPU time of the model tests). Cheap code generation:
# - JAX's `jax_disable_most_optimizations` (JAX_DISABLE_MOST_OPTIMIZATIONS=1): LLVM without optimisation passes
#   (`xla_backend_optimization_level=0`: the hypothesis scan-equivalence test 151 s -> 79 s, the ICL / PKD smoke
#   runs and notebooks 314 s -> 234 s, one core) and without its expensive passes (tests/models/test_mamba2.py
#   103-106 s -> 89.6-96.4 s of CPU, alternating pairs);
# - the classic loop emitters instead of the MLIR fusion emitters, and one codegen thread per program (two test
#   workers already fill two cores): tests/inference/test_speculative.py 121 s -> 57 s on two workers, its
#   backend compile time 166 s -> 53 s.
# A test that runs one program for hundreds of steps asks for the `optimized_xla` fixture instead (the ICL train
# step: 83 ms a step unoptimised, 16 ms optimised; compilation 1.0 s vs 3.9 s).
# Fast-math stays off; the last bits may differ from optimised code, as with any change of fusion, and
# tolerances already allow for that. Subprocesses and notebook kernels inherit the settings; settings the caller
# already made win. An XLA that does not know a flag aborts the process, so the flags are probed first.
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _add_xla_flags(*flags):
    present = os.environ.get("XLA_FLAGS", "")
    new = [f for f in flags if f.split("=")[0] not in present]
    os.environ["XLA_FLAGS"] = " ".join([present, *new]).strip()


def _xla_knows(*flags):
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip())
    probe = "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if not all(f.split("=")[0] in os.environ.get("XLA_FLAGS", "") for f in _FAST_COMPILE) and _xla_knows(*_FAST_COMPILE):
    _add_xla_flags(*_FAST_COMPILE)

# Keep freed host memory for reuse (one malloc arena, no mmap, no trimming) in this process and, through
# GLIBC_TUNABLES, in the subprocesses and notebook kernels: see `mamba_jax.cli.reuse_freed_host_memory`.
from mamba_jax.cli import reuse_freed_host_memory  # noqa: E402

reuse_freed_host_memory()

from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, print_blob=True)
settings.load_profile("default")


import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every cached compiled program after each test module.

    Each compiled CPU program keeps ~17 memory mappings (measured) and a process may hold 65,530
    (`vm.max_map_count`); one test process that had compiled ~3,700 programs crashed inside the compiler (SIGSEGV).
    Modules rarely share compiled programs, so this costs almost no recompilation."""
    yield
    jax.clear_caches()


@pytest.fixture
def optimized_xla(monkeypatch):
    """Compile with XLA's optimisations in this test (and its subprocesses): for tests whose time is spent
    running a program many times, not compiling it."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True)
def _restore_xla_flags():
    """`aot.topology_devices` drops the `--xla_cpu_*` flags for libtpu; later subprocesses get them back."""
    flags = os.environ.get("XLA_FLAGS")
    yield
    if flags is not None:
        os.environ["XLA_FLAGS"] = flags
