"""The suite's compile settings (tests/conftest.py): unoptimised code by default, optimised under the
`optimized_xla` fixture, in this process and for its subprocesses."""
import os

import jax
import pytest


def test_suite_compiles_without_optimisations_by_default():
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("the caller chose the optimisation level in XLA_FLAGS, which conftest leaves alone")
    assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
    assert jax.config.values["jax_disable_most_optimizations"] is True


def test_optimized_xla_turns_optimisations_back_on(optimized_xla):
    assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "0"
    assert jax.config.values["jax_disable_most_optimizations"] is False


def test_optimized_xla_is_undone_after_its_test():
    test_suite_compiles_without_optimisations_by_default()
