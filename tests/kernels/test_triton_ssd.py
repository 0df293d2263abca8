"""The GPU (Pallas Triton) variant of the SSD kernels, checked on a CPU host.

- Interpreted (`variant="triton", interpret=True`) against `ssd(impl="reference")` — the Mamba-1
  `lax.scan` over the heads flattened into channels, independent of the chunked algorithm — in values and
  in every gradient, on shapes that exercise the variant's own edges: p and n that are not powers of two
  (zero-padded to 16), a length not divisible by the chunk, l = 1 (padded to one 16-step chunk), groups <
  heads, initial and final states, seq_idx resets inside chunks and on chunk boundaries, bf16 inputs,
  and a float64 `check_grads`.
- Lowered for CUDA (`pallas_kernels.gpu_lowering`): the Pallas → Triton IR lowering of forward and
  backward runs on this host and must not raise; with `interpret=None` the CUDA lowering picks the Triton
  kernels. Triton's own compilation to PTX and any GPU run are not covered here.

The elementwise D / z / dt_bias parts around the kernel are plain JAX shared with the TPU variant and
tested through `ssd(impl="pallas")` in test_pallas_ssd.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

from mamba_jax.ops.ssd import ssd
from pallas_kernels.gpu_lowering import lower_for_cuda, triton_kernel_names
from pallas_kernels.ssd import BlockSizes, ssd_scan
from tests.kernels.test_pallas_selective_scan import assert_close
from tests.kernels.test_pallas_ssd import F32_TOL, SEQ_IDX_21
from tests.ops.test_ssd import make_case, ssd_cases

NAMES = ("x", "delta", "A", "B", "C", "initial_state")


def kernel_inputs(args):
    """The kernel's own inputs: Δ = softplus(dt + dt_bias) is applied outside the kernel."""
    delta = jax.nn.softplus(args["dt"] + (0 if args["dt_bias"] is None else args["dt_bias"]))
    return dict(x=args["x"], delta=delta, A=args["A"], B=args["B"], C=args["C"],
                initial_state=args["initial_state"])


@functools.partial(jax.jit, static_argnames=("impl", "chunk"))
def scan_with_vjp(floats, seq_idx, key, impl, chunk):
    def fn(fl):
        if impl == "triton":
            return ssd_scan(fl["x"], fl["delta"], fl["A"], fl["B"], fl["C"], initial_state=fl.get("initial_state"),
                            seq_idx=seq_idx, block_sizes=BlockSizes(chunk=chunk), variant="triton",
                            interpret=True)
        return ssd(fl["x"], fl["delta"], fl["A"], fl["B"], fl["C"], chunk_size=chunk,
                   initial_state=fl.get("initial_state"), seq_idx=seq_idx, return_final_state=True,
                   impl="reference")

    out, vjp = jax.vjp(fn, floats)
    k1, k2 = jax.random.split(key)
    # drawn in float32 for both impls (y is float32 from the kernel, bf16 from the reference for bf16 inputs)
    cot = (jax.random.normal(k1, out[0].shape).astype(out[0].dtype), jax.random.normal(k2, out[1].shape).astype(out[1].dtype))
    return out, vjp(cot)[0]


def compare(args, seq_idx, chunk, tol_for, key=0):
    floats = {k: v for k, v in kernel_inputs(args).items() if v is not None}
    key = jax.random.PRNGKey(key)
    (y, s), grads = scan_with_vjp(floats, seq_idx, key, "triton", chunk)
    (y_ref, s_ref), grads_ref = scan_with_vjp(floats, seq_idx, key, "reference", chunk)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert_close(y, y_ref.astype(y.dtype), tol_for("y"), "y")
    assert_close(s, s_ref.astype(s.dtype), tol_for("final_states"), "final_states")
    for name in grads_ref:
        assert grads[name].dtype == floats[name].dtype, name
        assert_close(grads[name], grads_ref[name], tol_for(name), f"d{name}")


CASES = {
    # (seed, b, l, h, p, g, n, chunk, options, seq_idx): Triton chunk 16
    # l = 21 → two chunks of 16, the second ragged; p = 3 and n = 5 padded to 16; 2 groups for 4 heads;
    # resets inside both chunks, and at step 16 (the second chunk's first step: its entering state is dropped)
    "ragged_groups_resets": (0, 2, 21, 4, 3, 2, 5, 16, {}, SEQ_IDX_21[:, :21]),
    # three full chunks of 16 (l = 48), one group, reset exactly on the boundary 31|32
    "three_chunks": (2, 1, 48, 2, 16, 1, 16, 16, {}, np.array([[0] * 32 + [1] * 16], np.int32)),
    # l = 1 (one chunk padded to 16 steps), no initial state, no seq_idx
    "l1_plain": (1, 1, 1, 2, 2, 1, 3, 256, dict(with_h0=False), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_variant_matches_reference(case):
    seed, b, l, h, p, g, n, chunk, options, seq_idx = CASES[case]
    args = make_case(seed, b, l, h, p, g, n, **options)
    compare(args, None if seq_idx is None else jnp.asarray(seq_idx), chunk, lambda name: F32_TOL, key=seed)


def test_triton_variant_bf16_inputs():
    """bf16 inputs, float32 inside. The kernel returns y and the final state in float32 (its compute
    dtype); the reference rounds y to bf16, so y and the bf16 input gradients may be one bf16 rounding
    step (2^-7 relative) apart; the float32 final state keeps the float32 tolerance."""
    args = make_case(3, 2, 20, 2, 4, 2, 4, with_seq_idx=True)
    seq_idx = args.pop("seq_idx")
    args = {k: None if v is None else v.astype(jnp.bfloat16) for k, v in args.items()}
    bf16_step = 2.0 ** -7
    compare(args, seq_idx, 16, lambda name: F32_TOL if name == "final_states" else bf16_step, key=3)


def test_triton_variant_float64_check_grads():
    """Interpret mode runs the Triton variant in float64 too: its custom VJP against finite differences
    (two chunks of 16, the second ragged, a reset inside the first)."""
    with jax.enable_x64(True):
        args = make_case(4, 1, 19, 2, 2, 1, 2, dtype=np.float64)
        seq_idx = jnp.asarray([[0] * 5 + [1] * 14], jnp.int32)
        floats = tuple(v for v in kernel_inputs(args).values())

        @jax.jit
        def f(*fl):
            return ssd_scan(*fl, seq_idx=seq_idx, block_sizes=BlockSizes(chunk=16), variant="triton",
                            interpret=True)

        y, s = f(*floats)
        assert y.dtype == jnp.float64 and s.dtype == jnp.float64
        check_grads(f, floats, order=1, modes=["rev"])


def test_triton_chunk_sizes():
    assert BlockSizes().triton_chunk(1000) == 64  # the register-resident (T, T) tiles cap it
    assert BlockSizes(chunk=32).triton_chunk(1000) == 32
    assert BlockSizes(chunk=100).triton_chunk(1000) == 64  # rounded down to a power of two
    assert BlockSizes(chunk=40).triton_chunk(1000) == 32
    assert BlockSizes().triton_chunk(20) == 32  # no longer than the sequence needs
    assert BlockSizes().triton_chunk(1) == 16  # matmul dims ≥ 16
    assert BlockSizes(chunk=4).triton_chunk(1000) == 16
    with pytest.raises(ValueError, match="`variant` must be None or one of"):
        a = make_case(0, 1, 4, 2, 2, 1, 2)
        ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], variant="gpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_cuda(dtype):
    """Forward and backward lower for CUDA through Pallas' Triton lowering on this CPU host (p = 64,
    n = 128, a ragged length, seq_idx, 2 groups for 4 heads); `interpret=None` picks the Triton kernels
    when lowering for CUDA, and only them."""
    b, l, h, p, g, n = 2, 300, 4, 64, 2, 128
    sd = jax.ShapeDtypeStruct
    args = (sd((b, l, h, p), dtype), sd((b, l, h), jnp.float32), sd((h,), jnp.float32), sd((b, l, g, n), dtype),
            sd((b, l, g, n), dtype), sd((b, h, p, n), jnp.float32), sd((b, l), jnp.int32))

    def forward(x, dt, A, B, C, h0, seq_idx):
        return ssd_scan(x, dt, A, B, C, initial_state=h0, seq_idx=seq_idx)

    def gradient(x, dt, A, B, C, h0, seq_idx):
        loss = lambda *a: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in forward(*a, seq_idx))
        return jax.grad(loss, argnums=tuple(range(6)))(x, dt, A, B, C, h0)

    assert triton_kernel_names(lower_for_cuda(forward, *args)) == ["ssd_fwd_triton"]
    assert triton_kernel_names(lower_for_cuda(gradient, *args)) == ["ssd_fwd_triton", "ssd_bwd_triton"]


@settings(max_examples=2, deadline=None)
@given(ssd_cases())
def test_hypothesis_random_shapes(case_and_chunk):
    """Random shapes (p, n, l, groups, chunk; initial states and seq_idx on or off): two draws per run."""
    case, chunk = case_and_chunk
    args = make_case(**case)
    seq_idx = args.pop("seq_idx", None)
    compare(args, seq_idx, chunk, lambda name: F32_TOL, key=case["seed"] % 1000)
