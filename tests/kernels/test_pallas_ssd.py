"""The Pallas SSD (Mamba-2) kernels (interpret mode on CPU) against `ssd(impl="reference")`.

Values and gradients (one shared random cotangent on y and the final states, through `jax.vjp`) on shapes
that exercise the kernel's edges: a length not divisible by the chunk, l = 1, groups < heads, initial and
final states, seq_idx resets inside chunks and exactly on chunk boundaries, D / z / dt_bias + softplus,
bf16 inputs; a float64 `check_grads` of the custom VJP; TPU semantics (`pltpu.InterpretParams`); and, with
libtpu, an AOT compile of forward and backward for a v5e chip (Mosaic lowering).

The expected values come from `impl="reference"`: the Mamba-1 `lax.scan` on the heads flattened into
channels, an algorithm independent of the chunked one the kernel implements.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from hypothesis import given, settings
from jax.test_util import check_grads

from mamba_jax.ops.ssd import ssd
from pallas_kernels.ssd import BlockSizes, ssd_scan
from tests.kernels.test_pallas_selective_scan import assert_close
from tests.ops.test_ssd import make_case, ssd_cases, ssd_with_vjp

# float32 results: the two impls sum the same products in different orders (a scan over time vs chunked
# matmuls), so they differ by float32 rounding of sums of at most a few hundred terms, ≲ 100·eps_f32
# ≈ 1e-5 of the largest value.
F32_TOL = 1e-5


def compare_with_reference(args, chunk, tol_for=lambda name, dtype: F32_TOL, key=0):
    """ssd(impl="pallas") vs ssd(impl="reference"): y, final states and every input's gradient for one
    shared random cotangent, each within `tol_for(name, dtype)` of the reference's largest value."""
    key = jax.random.PRNGKey(key)
    (y, s), grads = ssd_with_vjp(args, key, "pallas", chunk)
    (y_ref, s_ref), grads_ref = ssd_with_vjp(args, key, "reference", chunk)
    assert y.dtype == y_ref.dtype == args["x"].dtype and s.dtype == s_ref.dtype
    assert_close(y, y_ref, tol_for("y", y.dtype), "y")
    assert_close(s, s_ref, tol_for("final_states", s.dtype), "final_states")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads[name].dtype == args[name].dtype, name
        assert_close(grads[name], grads_ref[name], tol_for(name, grads[name].dtype), f"d{name}")


# seq_idx of the main case (l = 21, chunks of 8: steps 0-7, 8-15, 16-20). Row 0 resets inside a chunk (3),
# on a chunk's first step (8: the entering state is dropped for the whole chunk) and on a chunk's last step
# (15: the chunk passes on only that step's input) and 19 (inside the ragged chunk). Row 1 never resets
# until 19, so the initial state decays through two whole chunks.
SEQ_IDX_21 = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4],
                       [7] * 19 + [8, 8]], np.int32)

# Interpret-mode kernels take seconds to compile on 2 CPU cores, so each case covers several edges.
CASES = {
    # (seed, b, l, h, p, g, n, chunk, options, seq_idx)
    # 3 chunks, the last one ragged; 2 groups for 4 heads; resets inside chunks and on chunk boundaries;
    # D per head and channel, z, dt_bias + softplus, initial states
    "all_options_ragged": (0, 2, 21, 4, 3, 2, 5, 8, dict(D_shape=(4, 3)), SEQ_IDX_21),
    # l = 1 (the chunk fits to one step); one group; no initial state, seq_idx, D, z or dt_bias
    "l1_plain": (1, 1, 1, 2, 2, 1, 3, 256, dict(with_z=False, with_bias=False, with_h0=False), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pallas_matches_reference(case):
    seed, b, l, h, p, g, n, chunk, options, seq_idx = CASES[case]
    args = make_case(seed, b, l, h, p, g, n, **options)
    if seq_idx is not None:
        args["seq_idx"] = jnp.asarray(seq_idx)
    compare_with_reference(args, chunk, key=seed)


def test_bf16_inputs_match_reference_on_the_same_inputs():
    """Every input in bf16. Both impls compute in float32 from the same bf16 values and differ only by
    float32 rounding before the final cast, so a bf16 result (y, dx, ddt, dB, dC, dz, dD, d dt_bias, ...)
    may differ by one bf16 rounding step: |Δ| ≤ 2^-7·|v| (bf16 keeps 8 significant bits), checked against
    the array's largest value. The final state is float32 and keeps the float32 tolerance."""
    args = make_case(3, 2, 12, 2, 4, 2, 4, D_shape=(2,), with_seq_idx=True)
    args = {k: v.astype(jnp.bfloat16) if k != "seq_idx" else v for k, v in args.items()}
    bf16_step = 2.0 ** -7
    compare_with_reference(args, 8, lambda name, dtype: bf16_step if dtype == jnp.bfloat16 else F32_TOL, key=3)


def test_float64_check_grads_of_the_custom_vjp():
    """Interpret mode runs float64 (state and all kernel math), so the custom VJP is checked against finite
    differences: 3 chunks of 2 (the last ragged), a seq_idx reset, every option."""
    with jax.enable_x64(True):
        args = make_case(4, 1, 5, 2, 2, 1, 2, D_shape=(2,), dtype=np.float64)
        seq_idx = jnp.array([[0, 0, 0, 1, 1]], jnp.int32)
        names = sorted(k for k, v in args.items() if v is not None)

        @jax.jit
        def f(*floats):
            return ssd(**dict(zip(names, floats)), seq_idx=seq_idx, chunk_size=2, dt_softplus=True,
                       return_final_state=True, impl="pallas")

        y, s = f(*(args[k] for k in names))
        assert y.dtype == jnp.float64 and s.dtype == jnp.float64
        check_grads(f, tuple(args[k] for k in names), order=1, modes=["rev"])


def test_tpu_semantics_interpret_params():
    """`pltpu.InterpretParams()` interprets with TPU semantics (VMEM scratch, sequential grid,
    uninitialised memory as NaN); forward and backward of the kernel itself still match the reference.
    The residuals the VJP keeps are the inputs and the chunk-start states: none is as large as the
    per-step states (b, l, h, p, n) a differentiated scan would save."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's start-up warnings
    a = make_case(5, 1, 10, 2, 2, 1, 3, with_seq_idx=True)
    delta = jax.nn.softplus(a["dt"])
    seq_idx = a["seq_idx"]
    floats = (a["x"], delta, a["A"], a["B"], a["C"], a["initial_state"])

    def kernel(*v):
        return ssd_scan(*v, seq_idx=seq_idx, block_sizes=BlockSizes(chunk=4), interpret=pltpu.InterpretParams())

    def reference(x, d, A, B, C, h0):
        return ssd(x, d, A, B, C, chunk_size=4, initial_state=h0, seq_idx=seq_idx, return_final_state=True,
                   impl="reference")

    @jax.jit
    def both(floats, key):
        out, vjp = jax.vjp(kernel, *floats)
        residual_sizes.extend(leaf.size for leaf in jax.tree_util.tree_leaves(vjp))
        out_r, vjp_r = jax.vjp(reference, *floats)
        k1, k2 = jax.random.split(key)
        cot = (jax.random.normal(k1, out_r[0].shape), jax.random.normal(k2, out_r[1].shape))
        return out, out_r, vjp(cot), vjp_r(cot)

    residual_sizes = []
    out, out_r, g, g_r = both(floats, jax.random.PRNGKey(5))
    b, l, h, p = a["x"].shape
    assert residual_sizes and max(residual_sizes) < b * l * h * p * a["B"].shape[-1]
    for name, got, want in zip(("y", "final_states", "dx", "ddelta", "dA", "dB", "dC", "dh0"), out + g, out_r + g_r):
        assert_close(got, want, F32_TOL, name)


def test_dispatch_and_block_sizes():
    assert BlockSizes().fit(1000) == BlockSizes(chunk=256)
    assert BlockSizes().fit(5) == BlockSizes(chunk=5)
    assert BlockSizes(chunk=128).fit(300).tpu_aligned(300)
    assert BlockSizes(chunk=256).fit(40).tpu_aligned(40)  # one chunk: the full dimension
    assert not BlockSizes(chunk=8).fit(21).tpu_aligned(21)  # fine in interpret mode only
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="must be a positive int"):
            BlockSizes(chunk=bad)
    args = make_case(6, 1, 4, 2, 2, 1, 2)
    with pytest.raises(ValueError, match="`impl` must be one of"):
        ssd(**args, impl="palas")


def test_aot_compiles_mosaic_kernels_for_a_tpu_chip():
    """With libtpu, `ssd(impl="pallas")` forward + backward (bf16 inputs, every option, 2 groups for 4 heads,
    chunk 256 with a ragged last chunk, p = 64, n = 128) lowers through Mosaic and compiles for a v5e chip
    from this CPU host: the compiled program holds the two Mosaic kernels (fwd, bwd), picked at lowering
    time by `platform_dependent`."""
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot extra)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mamba_jax.aot import topology_devices

    devices = topology_devices("v5e:1x1")
    replicated = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    b, l, h, p, g, n = 2, 600, 4, 64, 2, 128

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    def forward(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx):
        return ssd(x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_state=h0,
                   seq_idx=seq_idx, return_final_state=True, impl="pallas")

    def loss(*args):
        y, final = forward(*args)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(final)

    args = (spec((b, l, h, p)), spec((b, l, h)), spec((h,), jnp.float32), spec((b, l, g, n)), spec((b, l, g, n)),
            spec((h,), jnp.float32), spec((b, l, h, p)), spec((h,), jnp.float32), spec((b, h, p, n), jnp.float32),
            spec((b, l), jnp.int32))
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 2


@settings(max_examples=2, deadline=None)
@given(ssd_cases())
def test_hypothesis_random_shapes(case_and_chunk):
    """Random shapes and options (groups, D per head or per channel, z, dt_bias, initial states, seq_idx,
    any chunk): two random draws per run (each one compiles the interpreted kernels, seconds on CPU)."""
    case, chunk = case_and_chunk
    args = make_case(**case)
    compare_with_reference(args, chunk, key=case["seed"] % 1000)
