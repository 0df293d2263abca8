"""Shared test set-up. Every test runs on CPU; float64 checks use `jax.enable_x64(True)` locally."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles thousands of small programs and runs most of them once or twice, so compile time
# dominates: LLVM without optimisation passes cuts it by up to half (measured: the hypothesis scan-equivalence test
# 151 s -> 79 s, the ICL / PKD smoke runs and notebooks 314 s -> 234 s, one core). Fast-math stays off; the
# last bits may differ from optimised code, as with any change of fusion, and tolerances already allow for
# that. Subprocesses inherit the flag; a level the caller already set wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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
