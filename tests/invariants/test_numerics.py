"""bf16 numerics at l = 1024: the scans keep their state and discretisation in float32 and the SSM
parameters (A_log, D, Δ bias) stay float32 under a bf16 param_dtype, so a bf16 forward is as accurate as
bf16 inputs allow.

Bounds from theory: bf16 keeps 8 significant bits, so rounding to it has relative spacing 2^-7 at worst
and an RMS relative error of at most 2^-7/sqrt(12) = 2.3e-3 per rounding. A scan that computes in float32
adds to the error already in its bf16 inputs (e_in, measured by running the float64 reference on the
rounded inputs) only the final cast of its output: e <= sqrt(e_in² + (2^-7/sqrt(12))²), with 10 % slack.
A model forward chains a few such roundings per layer (projections, conv, scan, norm, head), each adding
at most 2^-8 relative in the worst case: we allow 2e-2 relative (about five worst-case roundings in a row;
measured 0.4 % for Mamba-1 and 0.9 % for Mamba-2 here), far below the O(1) error of a broken dtype path.
"""
import contextlib
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.layers.config import FLOAT32_PARAM_NAMES, cast_params
from mamba_jax.ops import selective_scan, ssd
from tests.invariants.families import model_and_params, tokens

L = 1024
BF16_ROUNDING_RMS = 2.0 ** -7 / math.sqrt(12)


def long_memory_dt(shape, key):
    """Δ from 1e-3 (memory ~1000 steps, where exp(Δ·A) is within bf16's spacing of 1) to 0.5, per channel."""
    d = shape[-1]
    base = jnp.exp(jnp.linspace(math.log(1e-3), math.log(0.5), d))
    return base * jnp.exp(0.3 * jax.random.normal(key, shape))


def scan_case(op):
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    b, n = 2, 8
    if op == "selective_scan":
        d = 16
        args = dict(u=jax.random.normal(k[0], (b, L, d)), dt=long_memory_dt((b, L, d), k[1]),
                    A=-jnp.broadcast_to(jnp.arange(1.0, n + 1), (d, n)), B=jax.random.normal(k[2], (b, L, n)),
                    C=jax.random.normal(k[3], (b, L, n)), D=jnp.ones(d), z=jax.random.normal(k[4], (b, L, d)))
        low = ("u", "B", "C", "z")
    else:
        h, p = 4, 4
        args = dict(x=jax.random.normal(k[0], (b, L, h, p)), dt=long_memory_dt((b, L, h), k[1]),
                    A=-jnp.arange(1.0, h + 1), B=jax.random.normal(k[2], (b, L, 1, n)),
                    C=jax.random.normal(k[3], (b, L, 1, n)), D=jnp.ones(h))
        low = ("x", "B", "C")
    return args, low


def run_op(op, impl, args):
    if op == "selective_scan":
        return selective_scan(**args, impl=impl, chunk_size=128)
    return ssd(**args, chunk_size=128, impl=impl)


def relative_error(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def scan_errors(op, impl, plant=contextlib.nullcontext):
    """(error of the bf16 run, the bound) against the float64 reference on the original inputs. `plant`: a
    context manager around the bf16 run only (the companion's planted bug)."""
    args, low = scan_case(op)
    with jax.enable_x64(True):
        f64 = {k: v.astype(jnp.float64) for k, v in args.items()}
        ref = run_op(op, "reference", f64)
        rounded = {k: (v.astype(jnp.bfloat16).astype(jnp.float64) if k in low else v) for k, v in f64.items()}
        e_in = relative_error(run_op(op, "reference", rounded), ref)
        with plant():
            y = run_op(op, impl, {k: (v.astype(jnp.bfloat16) if k in low else v) for k, v in args.items()})
    assert y.dtype == jnp.bfloat16
    return relative_error(y, ref), 1.1 * math.sqrt(e_in ** 2 + BF16_ROUNDING_RMS ** 2)


@pytest.mark.parametrize("op, impl", [("selective_scan", "reference"), ("selective_scan", "associative"),
                                      ("selective_scan", "chunked"), ("selective_scan", "chunked_associative"),
                                      ("ssd", "reference"), ("ssd", "chunked")])
def test_bf16_scans_add_only_the_output_rounding(op, impl):
    error, bound = scan_errors(op, impl)
    assert error <= bound, (op, impl, error, bound)


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_bf16_bound_catches_a_bf16_state(op, monkeypatch):
    """Planted: the scan's state and discretisation in bf16 (what 'compute_dtype' prevents) — the error then
    exceeds the bound (measured ~2x the float32-state error at l = 1024)."""
    @contextlib.contextmanager
    def bf16_state():
        with monkeypatch.context() as m:
            for name in {f"mamba_jax.ops.{op}", "mamba_jax.ops.selective_scan"}:   # ssd's reference: the Mamba-1 scan
                m.setattr(importlib.import_module(name), "compute_dtype", lambda *arrays: jnp.dtype(jnp.bfloat16))
            jax.clear_caches()
            yield
        jax.clear_caches()

    error, bound = scan_errors(op, "chunked", bf16_state)
    assert error > bound, (op, error, bound)


@pytest.mark.parametrize("name", ["M[chunked]", "M2[chunked]"])
def test_bf16_model_forward_at_1k_tokens(name):
    """A bf16 model (dtype and param_dtype bfloat16) against the float32 model on the same weights, l = 1024,
    trained-scale weights with long-memory channels: relative error of the logits <= 2e-2; the SSM
    parameters stay float32."""
    model, params = model_and_params(name)
    params = jax.tree_util.tree_map_with_path(
        lambda path, w: (jnp.log(jnp.expm1(long_memory_dt(w.shape, jax.random.PRNGKey(1))[..., :]))
                         if getattr(path[-1], "key", "") in ("dt_proj_bias", "dt_bias") else w), params)
    bf16 = type(model)(model.config.replace(dtype="bfloat16", param_dtype="bfloat16"))
    low = cast_params(params, jnp.bfloat16)
    kinds = {getattr(p[-1], "key", ""): w.dtype for p, w in jax.tree_util.tree_flatten_with_path(low)[0]}
    assert all(kinds[k] == jnp.float32 for k in FLOAT32_PARAM_NAMES if k in kinds)
    assert kinds.get("conv1d_kernel", kinds.get("conv1d_x_kernel")) == jnp.bfloat16   # the rest in param_dtype
    x = tokens(3, 1, L)
    want = jax.jit(model.apply)({"params": params}, x)
    got = jax.jit(bf16.apply)({"params": low}, x)
    assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
    assert relative_error(got, want) <= 2e-2, relative_error(got, want)
