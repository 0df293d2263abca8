"""The GPU (Pallas Triton) variant of the selective-scan kernels, checked on a CPU host.

- Interpreted (`variant="triton", interpret=True`) against `selective_scan(impl="reference")` (the
  `lax.scan` recurrence) in values, final state and every gradient (one shared random cotangent through
  `jax.vjp`), on shapes that exercise the variant's own edges: d and n that are not powers of two (each
  group's channels zero-padded to a multiple of the power-of-two channel block, n to a power of two),
  several channel blocks per B/C group, a length not divisible by the chunk, l = 1, a seq_idx reset on a
  chunk boundary and inside chunks, D / z / dt_bias / initial state present and absent, softplus on
  and off; bf16 inputs; a float64 `check_grads` of the custom VJP.
- Lowered for CUDA (`pallas_kernels.gpu_lowering`): the Pallas → Triton IR lowering of forward and
  backward runs on this host and must not raise; with `interpret=None` the CUDA lowering picks the Triton
  kernels (and only them), and the backward kernel holds the barrier around its state workspace.
  Triton's own compilation to PTX and any GPU run are not covered here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mamba_jax.ops import selective_scan
from pallas_kernels.gpu_lowering import TRITON_CUSTOM_CALL, lower_for_cuda, triton_kernel_names
from pallas_kernels.selective_scan import BlockSizes
from pallas_kernels.selective_scan import selective_scan as pallas_scan
from tests.kernels.test_pallas_selective_scan import assert_close
from tests.ops.test_selective_scan import make_case

F32_TOL = 1e-5  # as in test_pallas_selective_scan.py: both sides compute in float32


def run_both(args, seq_idx, softplus, block_sizes, key):
    """Outputs and gradients (for one shared random cotangent) of the interpreted Triton variant and the
    reference, over the non-None float arguments `args`."""
    floats = {k: v for k, v in args.items() if v is not None}
    names = tuple(floats)

    def fn(impl):
        def f(*arrays):
            kw = dict(zip(names, arrays), dt_softplus=softplus, seq_idx=seq_idx, return_final_state=True)
            if impl == "triton":
                return pallas_scan(**kw, block_sizes=block_sizes, variant="triton", interpret=True)
            return selective_scan(**kw, impl="reference")
        return f

    @jax.jit
    def run(arrays, cot_key):
        out_k, vjp_k = jax.vjp(fn("triton"), *arrays)
        out_r, vjp_r = jax.vjp(fn("reference"), *arrays)
        k1, k2 = jax.random.split(cot_key)
        cot = (jax.random.normal(k1, out_r[0].shape).astype(out_r[0].dtype),
               jax.random.normal(k2, out_r[1].shape).astype(out_r[1].dtype))
        return out_k, out_r, dict(zip(names, vjp_k(cot))), dict(zip(names, vjp_r(cot)))

    return (floats,) + run(tuple(floats.values()), jax.random.PRNGKey(key))


def compare(args, seq_idx, softplus, block_sizes, tol_for, key=0):
    floats, out_k, out_r, g_k, g_r = run_both(args, seq_idx, softplus, block_sizes, key)
    assert out_k[0].dtype == floats["u"].dtype and out_k[0].shape == out_r[0].shape
    assert out_k[1].shape == out_r[1].shape
    assert_close(out_k[0], out_r[0], tol_for("y"), "y")
    assert_close(out_k[1], out_r[1], tol_for("last_state"), "last_state")
    for name in floats:
        assert g_k[name].dtype == floats[name].dtype, name
        assert_close(g_k[name], g_r[name], tol_for(name), f"d{name}")


RESET_AT_8 = np.array([[0] * 8 + [1] * 8], np.int32)

CASES = {
    # (seed, b, l, d, n, groups, make_case options, seq_idx, softplus, BlockSizes)
    # d = 12 in 2 groups of 6, block_d 4: 2 channel blocks per group, each group padded 6 → 8 channels;
    # n = 3 → 4; 3 chunks of 8 (the last ragged); resets inside chunks; every option
    "all_options_padded_ragged": (0, 2, 21, 12, 3, 2, dict(with_seq_idx=True), "case", True, BlockSizes(4, 8)),
    # l = 1 (one chunk of one step); d = 5 → one block of 8, n = 5 → 8; no D, z, bias, initial state
    "l1_bare": (1, 1, 1, 5, 5, None, dict(with_D=False, with_z=False, with_bias=False, with_h0=False), None,
                True, BlockSizes()),
    # two full chunks of 8 (no padded steps), a reset exactly on the chunk boundary; softplus off
    # (Δ = |dt| + |bias| > 0), D and bias without z, no initial state; powers of two throughout
    "chunk_boundary_reset": (2, 1, 16, 8, 4, None, dict(with_z=False, with_h0=False), RESET_AT_8, False,
                             BlockSizes(8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_variant_matches_reference(case):
    seed, b, l, d, n, groups, options, seq_idx, softplus, blocks = CASES[case]
    args = make_case(seed, b, l, d, n, groups, **options)
    seq_idx = args.pop("seq_idx", None) if isinstance(seq_idx, str) else seq_idx
    if not softplus:
        args["dt"], args["dt_bias"] = jnp.abs(args["dt"]), jnp.abs(args["dt_bias"])
    compare(args, None if seq_idx is None else jnp.asarray(seq_idx), softplus, blocks, lambda name: F32_TOL,
            key=seed)


def test_triton_variant_bf16_inputs():
    """u, dt, B, C, z in bf16 (A, D, dt_bias, initial_state float32), float32 inside. Both impls
    compute in float32 from the same bf16 values and differ only by float32 rounding before the final
    cast, so a bf16 result may be one bf16 rounding step apart: |Δ| <= 2^-7·max|x| (8 significant bits);
    float32 results (state, dA, dD, d dt_bias, d initial_state) keep a float32-level tolerance (1e-4
    for the gradients, as in the TPU variant's bf16 test: they sum bf16-rounded inputs over the sequence)."""
    args = make_case(3, 2, 12, 6, 3, with_seq_idx=True)
    seq_idx = args.pop("seq_idx")
    args = {k: v.astype(jnp.bfloat16) if k in ("u", "dt", "B", "C", "z") else v for k, v in args.items()}
    bf16_step = 2.0 ** -7

    def tol(name):
        if name == "last_state":
            return F32_TOL
        return bf16_step if name in ("y", "u", "dt", "B", "C", "z") else 1e-4

    compare(args, seq_idx, True, BlockSizes(block_l=8), tol, key=3)


def test_triton_variant_float64_check_grads():
    """Interpret mode runs the Triton variant in float64 too: its custom VJP against finite differences
    (three chunks of 2 steps, the last ragged; d = 3 and n = 3 both padded to 4; a reset; every option)."""
    with jax.enable_x64(True):
        args = make_case(4, 1, 5, 3, 3, dtype=np.float64)
        seq_idx = jnp.array([[0, 0, 0, 1, 1]], jnp.int32)
        names = tuple(args)

        @jax.jit
        def f(*arrays):
            return pallas_scan(**dict(zip(names, arrays)), dt_softplus=True, seq_idx=seq_idx,
                               return_final_state=True, block_sizes=BlockSizes(block_l=2), variant="triton",
                               interpret=True)

        y, state = f(*args.values())
        assert y.dtype == jnp.float64 and state.dtype == jnp.float64
        check_grads(f, tuple(args.values()), order=1, modes=["rev"])


def test_triton_block_sizes_and_variant_validation():
    assert BlockSizes().triton_block_d(1536) == 64  # register-resident (n, block_d) tiles cap it
    assert BlockSizes(block_d=32).triton_block_d(1536) == 32
    assert BlockSizes(block_d=48).triton_block_d(1536) == 32  # rounded down to a power of two
    assert BlockSizes().triton_block_d(6) == 8  # no wider than the group needs (rounded up)
    assert BlockSizes().triton_block_d(1) == 1
    with pytest.raises(ValueError, match="`variant` must be None or one of"):
        a = make_case(0, 1, 4, 2, 2)
        pallas_scan(a["u"], a["dt"], a["A"], a["B"], a["C"], variant="gpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_cuda(dtype):
    """Forward and backward lower for CUDA through Pallas' Triton lowering on this CPU host (d = 384 in
    2 groups: 3 channel blocks of 64 per group; n = 16; a ragged length; seq_idx; every option);
    `interpret=None` picks the Triton kernels when lowering for CUDA, and only them. The backward's IR
    holds the CTA barrier (`gpu.barrier`) that orders its workspace writes and reads."""
    b, l, d, n, g = 2, 300, 384, 16, 2
    sd = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = (sd((b, l, d), dtype), sd((b, l, d), dtype), sd((d, n), f32), sd((b, l, g, n), dtype),
            sd((b, l, g, n), dtype), sd((d,), f32), sd((b, l, d), dtype), sd((d,), f32), sd((b, d, n), f32),
            sd((b, l), jnp.int32))

    def forward(u, dt, A, B, C, D, z, bias, h0, seq_idx):
        return pallas_scan(u, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True, initial_state=h0,
                           seq_idx=seq_idx, return_final_state=True)

    def gradient(*a):
        loss = lambda *x: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in forward(*x, a[-1]))
        return jax.grad(loss, argnums=tuple(range(9)))(*a[:-1])

    assert triton_kernel_names(lower_for_cuda(forward, *args)) == ["selective_scan_fwd_triton"]
    text = lower_for_cuda(gradient, *args)
    assert triton_kernel_names(text) == ["selective_scan_fwd_triton", "selective_scan_bwd_triton"]
    calls = [line for line in text.splitlines() if TRITON_CUSTOM_CALL in line]
    assert "gpu.barrier" not in calls[0] and "gpu.barrier" in calls[1]


@pytest.mark.parametrize("b, l, d, n", [(1, 1, 5, 3), (1, 7, 1, 1)])
def test_tiny_shapes_lower_for_cuda(b, l, d, n):
    """The smallest power-of-two tiles (d = 5 → 8, n = 3 → 4, l = 1; and 1 × 1 state tiles) lower too."""
    sd = jax.ShapeDtypeStruct
    args = tuple(sd(shape, jnp.float32) for shape in ((b, l, d), (b, l, d), (d, n), (b, l, n), (b, l, n)))

    def gradient(*a):
        loss = lambda *x: jnp.sum(pallas_scan(*x, dt_softplus=True) ** 2)
        return jax.grad(loss, argnums=tuple(range(5)))(*a)

    names = triton_kernel_names(lower_for_cuda(gradient, *args))
    assert names == ["selective_scan_fwd_triton", "selective_scan_bwd_triton"]
