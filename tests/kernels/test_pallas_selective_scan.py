"""The Pallas selective-scan kernels (interpret mode on CPU) against `impl="reference"`.

Values and gradients (a shared random cotangent through `jax.vjp`) on shapes that exercise the kernel's
edges: l = 1, lengths not divisible by the sequence block, several channel blocks per B/C group,
initial state and final state, seq_idx resets across block boundaries, D / z / dt_bias + softplus,
bf16 inputs; float64 `check_grads` of the custom VJP; TPU semantics (`pltpu.InterpretParams`); and,
with libtpu, an AOT compile of forward + backward for a TPU chip (Mosaic lowering).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from mamba_jax.ops import resolve_impl, selective_scan
from pallas_kernels.selective_scan import BlockSizes
from pallas_kernels.selective_scan import selective_scan as pallas_scan

ARG_NAMES = ("u", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(key, b, l, d, n, groups=None, dtype=jnp.float32, extras=True, seq_resets=False):
    """Random inputs of the scan contract. A < 0 and softplus keep the recurrence stable.

    Returns (arrays: dict of the differentiable arguments, seq_idx (b, l) int32 or None)."""
    ks = jax.random.split(key, 10)
    bc_shape = (b, l, n) if groups is None else (b, l, groups, n)
    arrays = dict(
        u=jax.random.normal(ks[0], (b, l, d), dtype),
        dt=(0.5 * jax.random.normal(ks[1], (b, l, d))).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n))).astype(dtype if dtype == jnp.float64 else jnp.float32),
        B=jax.random.normal(ks[3], bc_shape, dtype),
        C=jax.random.normal(ks[4], bc_shape, dtype),
    )
    if extras:
        param = jnp.float64 if dtype == jnp.float64 else jnp.float32
        arrays.update(
            D=jax.random.normal(ks[5], (d,), param),
            z=jax.random.normal(ks[6], (b, l, d), dtype),
            dt_bias=(0.5 * jax.random.normal(ks[7], (d,))).astype(param),
            initial_state=jax.random.normal(ks[8], (b, d, n), param),
        )
    seq_idx = None
    if seq_resets:
        seq_idx = jnp.cumsum(jax.random.bernoulli(ks[9], 0.2, (b, l)), axis=1).astype(jnp.int32)
    return arrays, seq_idx


def scan_fn(impl, seq_idx, softplus, names, **kw):
    """f(*arrays) -> (y, last_state) of `selective_scan` with the arrays named `names`."""
    def f(*arrays):
        return selective_scan(**dict(zip(names, arrays)), dt_softplus=softplus, seq_idx=seq_idx,
                              return_final_state=True, impl=impl, **kw)
    return f


def vjp_both(f_kernel, f_ref, arrays, key):
    """Outputs and gradients (for one shared random cotangent) of both functions."""
    names = tuple(arrays)
    args = tuple(arrays[k] for k in names)

    @jax.jit
    def run(args, cot_key):
        out_k, vjp_k = jax.vjp(f_kernel, *args)
        out_r, vjp_r = jax.vjp(f_ref, *args)
        k1, k2 = jax.random.split(cot_key)
        cot = (jax.random.normal(k1, out_r[0].shape).astype(out_r[0].dtype),
               jax.random.normal(k2, out_r[1].shape).astype(out_r[1].dtype))
        return out_k, out_r, dict(zip(names, vjp_k(cot))), dict(zip(names, vjp_r(cot)))

    return run(args, key)


def assert_close(got, want, rtol, name):
    """|got - want| <= rtol * max|want| (+ tiny), elementwise, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, name
    assert np.all(np.isfinite(got)), name
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


# Interpret-mode kernels take seconds to compile on 2 CPU cores, so each case covers several edges.
CASES = {
    # name: (b, l, d, n, groups, extras, seq_resets, chunk_size (= block_l)); l = 1 is an explicit example
    # of the hypothesis test below.
    # grouped B/C, seq_idx resets, D/z/dt_bias+softplus, initial state, 3 sequence blocks, last one ragged
    "all_options_ragged": (2, 21, 8, 3, 2, True, True, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dispatcher_pallas_matches_reference(case):
    b, l, d, n, groups, extras, resets, chunk = CASES[case]
    arrays, seq_idx = make_inputs(jax.random.PRNGKey(len(case)), b, l, d, n, groups, extras=extras,
                                  seq_resets=resets)
    names = tuple(arrays)
    out_k, out_r, g_k, g_r = vjp_both(
        scan_fn("pallas", seq_idx, True, names, chunk_size=chunk),
        scan_fn("reference", seq_idx, True, names), arrays, jax.random.PRNGKey(7))
    assert out_k[0].dtype == jnp.float32 and out_k[1].dtype == jnp.float32
    assert_close(out_k[0], out_r[0], 1e-5, "y")
    assert_close(out_k[1], out_r[1], 1e-5, "last_state")
    for name in names:
        assert_close(g_k[name], g_r[name], 1e-5, f"d{name}")


def test_several_channel_blocks_per_group_and_sequence_blocks():
    """d = 32 in 2 groups, block_d = 8: 2 channel blocks per group (dB/dC summed across them), 3 sequence
    blocks with a ragged last one; seq_idx resets, initial state, D, z, dt_bias without softplus
    (Δ = |dt| + |bias| > 0 keeps the recurrence stable)."""
    arrays, seq_idx = make_inputs(jax.random.PRNGKey(3), 2, 20, 32, 4, groups=2, seq_resets=True)
    arrays["dt"], arrays["dt_bias"] = jnp.abs(arrays["dt"]), jnp.abs(arrays["dt_bias"])
    names = tuple(arrays)

    def f_kernel(*args):
        return pallas_scan(**dict(zip(names, args)), dt_softplus=False, seq_idx=seq_idx, return_final_state=True,
                           block_sizes=BlockSizes(block_d=8, block_l=8))

    out_k, out_r, g_k, g_r = vjp_both(f_kernel, scan_fn("reference", seq_idx, False, names), arrays,
                                      jax.random.PRNGKey(8))
    assert_close(out_k[0], out_r[0], 1e-5, "y")
    assert_close(out_k[1], out_r[1], 1e-5, "last_state")
    for name in names:
        assert_close(g_k[name], g_r[name], 1e-5, f"d{name}")


def test_bf16_inputs_match_reference_on_the_same_inputs():
    """u, dt, B, C, z in bf16 (A, D, dt_bias, initial_state float32). Both impls compute in float32 from
    the same bf16 values and differ only by float32 rounding before the final cast, so a bf16 result
    may differ by one bf16 rounding step: |Δ| <= 2^-7·|x| (bf16 keeps 8 significant bits), checked
    against the largest value of the array. float32 results (state, dA, dD, d dt_bias, d initial_state)
    keep a float32 tolerance. The state stays float32."""
    arrays, seq_idx = make_inputs(jax.random.PRNGKey(5), 2, 12, 8, 4, dtype=jnp.bfloat16, seq_resets=True)
    names = tuple(arrays)
    out_k, out_r, g_k, g_r = vjp_both(
        scan_fn("pallas", seq_idx, True, names, chunk_size=8), scan_fn("reference", seq_idx, True, names),
        arrays, jax.random.PRNGKey(9))
    assert out_k[0].dtype == jnp.bfloat16 and out_k[1].dtype == jnp.float32
    bf16_step = 2.0 ** -7
    assert_close(out_k[0], out_r[0], bf16_step, "y")
    assert_close(out_k[1], out_r[1], 1e-5, "last_state")
    for name in names:
        assert g_k[name].dtype == arrays[name].dtype, name
        tol = bf16_step if arrays[name].dtype == jnp.bfloat16 else 1e-4
        assert_close(g_k[name], g_r[name], tol, f"d{name}")


def test_float64_check_grads_of_the_custom_vjp():
    """Interpret mode runs float64 (state and all kernel math in float64), so the custom VJP is checked
    against finite differences; two sequence blocks (block_l = 2), a seq_idx reset, every option."""
    with jax.enable_x64(True):
        arrays, _ = make_inputs(jax.random.PRNGKey(11), 1, 5, 3, 2, dtype=jnp.float64)
        seq_idx = jnp.array([[0, 0, 0, 1, 1]], jnp.int32)
        names = tuple(arrays)
        f = jax.jit(scan_fn("pallas", seq_idx, True, names, chunk_size=2))
        y, state = f(*arrays.values())
        assert y.dtype == jnp.float64 and state.dtype == jnp.float64
        check_grads(f, tuple(arrays.values()), order=1, modes=["rev"])


def test_tpu_semantics_interpret_params():
    """`pltpu.InterpretParams()` interprets with TPU semantics (VMEM scratch, sequential grid,
    uninitialised memory as NaN); forward and backward still match the reference."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's start-up warnings
    arrays, seq_idx = make_inputs(jax.random.PRNGKey(13), 1, 12, 8, 2, extras=False, seq_resets=True)
    names = tuple(arrays)

    def f_kernel(*args):
        return pallas_scan(**dict(zip(names, args)), dt_softplus=True, seq_idx=seq_idx, return_final_state=True,
                           block_sizes=BlockSizes(block_d=8, block_l=8), interpret=pltpu.InterpretParams())

    out_k, out_r, g_k, g_r = vjp_both(f_kernel, scan_fn("reference", seq_idx, True, names), arrays,
                                      jax.random.PRNGKey(14))
    assert_close(out_k[0], out_r[0], 1e-5, "y")
    assert_close(out_k[1], out_r[1], 1e-5, "last_state")
    for name in names:
        assert_close(g_k[name], g_r[name], 1e-5, f"d{name}")


@settings(max_examples=1, deadline=None)
@given(l=st.integers(1, 12), d=st.sampled_from([4, 8]), n=st.integers(1, 3), block_l=st.sampled_from([3, 4, 8]),
       seed=st.integers(0, 2**16))
@example(l=1, d=8, n=3, block_l=128, seed=0)  # l = 1: one block of one step
def test_hypothesis_random_shapes(l, d, n, block_l, seed):
    """Random shapes (grouped B/C, seq_idx, every option) — one random draw plus l = 1."""
    arrays, seq_idx = make_inputs(jax.random.PRNGKey(seed), 1, l, d, n, groups=2, seq_resets=True)
    names = tuple(arrays)
    out_k, out_r, g_k, g_r = vjp_both(
        scan_fn("pallas", seq_idx, True, names, chunk_size=block_l), scan_fn("reference", seq_idx, True, names),
        arrays, jax.random.PRNGKey(seed + 1))
    assert_close(out_k[0], out_r[0], 1e-5, "y")
    assert_close(out_k[1], out_r[1], 1e-5, "last_state")
    for name in names:
        assert_close(g_k[name], g_r[name], 1e-5, f"d{name}")


def test_dispatch_and_block_sizes():
    assert resolve_impl("pallas", 16) == "pallas"
    assert BlockSizes().fit(1000, 1536) == BlockSizes(block_d=128, block_l=128)
    assert BlockSizes(block_d=512).fit(5, 1536) == BlockSizes(block_d=512, block_l=5)
    assert BlockSizes(block_d=256).fit(300, 384) == BlockSizes(block_d=128, block_l=128)  # 384 = 3·128
    assert BlockSizes(block_d=128).fit(8, 96) == BlockSizes(block_d=96, block_l=8)  # whole group
    assert BlockSizes(block_d=16).fit(8, 24) == BlockSizes(block_d=12, block_l=8)  # divisor, not aligned
    assert BlockSizes().fit(1000, 1536).tpu_aligned(1000, 1536)
    assert not BlockSizes(block_d=12, block_l=8).tpu_aligned(8, 24)
    for bad in (dict(block_d=0), dict(block_l=-1), dict(block_l=2.0), dict(block_d=True)):
        with pytest.raises(ValueError, match="must be a positive int"):
            BlockSizes(**bad)


def test_aot_compiles_mosaic_kernels_for_a_tpu_chip():
    """With libtpu, `impl="pallas"` forward + backward (bf16 inputs, every option, grouped B/C with two
    channel blocks per group, a ragged last sequence block) lowers through Mosaic and compiles for a v5e
    chip from this CPU host: the compiled program holds the two Mosaic kernels (fwd, bwd), picked at
    lowering time by `platform_dependent`."""
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot extra)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mamba_jax.aot import topology_devices

    devices = topology_devices("v5e:1x1")
    replicated = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    b, l, d, n, g = 2, 300, 512, 16, 2

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    def loss(u, dt, A, B, C, D, z, dt_bias, h0, seq_idx):
        y, last = selective_scan(u, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                 initial_state=h0, seq_idx=seq_idx, return_final_state=True, impl="pallas")
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(last)

    args = (spec((b, l, d)), spec((b, l, d)), spec((d, n), jnp.float32), spec((b, l, g, n)), spec((b, l, g, n)),
            spec((d,), jnp.float32), spec((b, l, d)), spec((d,), jnp.float32), spec((b, d, n), jnp.float32),
            spec((b, l), jnp.int32))
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 2
