"""Mamba-2 SSD chunked scan as Pallas kernels (TPU / Mosaic layout), forward and backward.

Per head h (scalar decay A_h) and per step t, with Δ_t ≥ 0 already discretised (softplus/bias applied):

    S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t B_tᵀ        state S: (p, n), held transposed (n, p) in the kernel
    y_t = S_t C_t

computed chunk by chunk (Dao & Gu 2024). For a chunk of T steps starting from state S_in (n, p), with
cum_i = Σ_{k≤i} Δ_k A (chunk-local cumulative log-decay) and the segment mask of `seq_idx`:

    L[i, j]  = exp(cum_i − cum_j)  for j ≤ i in the same segment, else 0            (T, T)
    y        = ((C Bᵀ) ∘ L) (Δ ∘ x)  +  e ∘ (C S_in)        e_i = exp(cum_i)·[no reset in (start, i]]
    S_out    = decay · S_in + Bᵀ (w ∘ Δ ∘ x)                  w_j = L[T−1, j],  decay = e_{T−1}

What is in the kernels: everything above (the intra-chunk quadratic form, the inter-chunk contribution,
the state recurrence with seq_idx resets, initial and final state) and, in the backward kernel, the
gradients of all of it (x, Δ, A, B, C, initial state). What is not: Δ = softplus(dt + dt_bias), the
D skip and the z gate are elementwise and stay in plain JAX around the kernel (`mamba_jax.ops.ssd`,
differentiated by JAX), as do the layout transposes, the padding and the per-group sums of dB/dC.

Layout (one program = one batch row × one head × one chunk):

- grid (b, h, n_chunks); the chunk axis is last and sequential ("arbitrary" on TPU), batch and heads
  "parallel". The state (n, p) lives in a VMEM scratch buffer in float32 (float64 for float64 inputs,
  interpret mode only), carried from one chunk to the next.
- x, y, dy: (b, h, L, p), blocks (T, p); y (and dy) in the compute dtype, x in its own.
  Δ: (b, h, 1, L), blocks (1, T) — a row, so that the HBM array is not padded to 128 lanes per step as a
  (L, 1) column would be; turned into a column in VMEM (`_to_col`). A: (h, 1, 1).
  B, C: (b, g, L, n), blocks (T, n), and transposed (b, g, n, L), blocks (n, T), so that every matmul is
  a plain or right-transposed (`a @ bᵀ`) one. Chunk-relative segment ids from seq_idx: (b, 1, L).
- the forward writes the state entering every chunk, (b, h, n_chunks, n, p): the only residual of
  size ∝ n besides the inputs (O(b·h·n·p·l/T), never O(b·l·h·p·n)).
- the backward runs the chunk grid in reverse, carrying the state cotangent (n, p) in VMEM, and
  recomputes each chunk's L from Δ and A. dB/dC are written per head (b, h, L, n) and summed over the
  heads of a group outside; dA is accumulated per (batch row, head) across chunks and summed over the
  batch outside.

The cumulative sum is taken inside a chunk only and the forward decays are exp(cum_i − cum_j), as in the
official Triton kernels: the relative error of a decay factor is about eps·|Σ_chunk Δ A| (the chunked
jnp impl's segment sum avoids even that). The backward sums the log-decay cotangent directly over the
(i, j) pairs a step lies between (the official "ddAcs_stable" form) instead of differencing cumulative
sums. Matmuls use `Precision.HIGHEST` with float32 accumulation (bf16 inputs are cast to float32 after
loading).

Padding: a length not divisible by the chunk is padded with Δ = 0, x = B = C = 0 (decay exp(0) = 1 and
no input: the state passes through unchanged); the padded outputs are sliced away.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan.step import _SQUEEZED, zero_pad_axis  # shared helpers
from pallas_kernels.ssd.blocks import BlockSizes
from pallas_kernels.ssd.step import _bwd_chunk, _Config, _fwd_chunk, _load, _named, _seg_input



def _compiler_params():
    """TPU compiler params: batch rows and heads parallel, the chunk axis sequential."""
    params_cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return params_cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _calls(cfg: _Config):
    """The (forward, backward) pallas_call wrappers of cfg's variant."""
    if cfg.variant == "triton":
        from pallas_kernels.ssd import triton_kernel

        return triton_kernel.forward_call, triton_kernel.backward_call
    return _forward_call, _backward_call


def _fwd_kernel(*refs, cfg: _Config, names):
    r = _named(refs, names)
    s_scr = refs[len(names)]
    cd = cfg.dtype
    ci = pl.program_id(2)

    @pl.when(ci == 0)
    def _():
        s_scr[...] = r["h0"][...].astype(cd)

    S = s_scr[...]  # (n, p) state entering this chunk
    if "h_starts" in r:  # kept for the backward (only when differentiating)
        r["h_starts"][...] = S
    x, dt, A, C, Bt = (_load(r, name, cd) for name in ("x", "dt", "A", "C", "Bt"))
    y, S = _fwd_chunk(cfg, S, x, dt, A, C, Bt, _seg_input(cfg, r))
    r["y"][...] = y.astype(r["y"].dtype)
    s_scr[...] = S

    @pl.when(ci == cfg.n_chunks - 1)
    def _():
        r["h_last"][...] = S.astype(r["h_last"].dtype)


def _bwd_kernel(*refs, cfg: _Config, names):
    r = _named(refs, names)
    g_scr = refs[len(names)]
    cd = cfg.dtype
    step = pl.program_id(2)  # the chunk grid runs in reverse: chunk n_chunks - 1 - step

    @pl.when(step == 0)
    def _():
        g_scr[...] = r["dh_last"][...].astype(cd)
        r["dA"][...] = jnp.zeros(r["dA"].shape, r["dA"].dtype)

    G = g_scr[...]  # (n, p) cotangent of the state leaving this chunk
    S = r["h_starts"][...].astype(cd)  # (n, p) state entering it
    x, dt, A, B, C, Ct, dy = (_load(r, name, cd) for name in ("x", "dt", "A", "B", "C", "Ct", "dy"))
    dx, ddt, dB, dC, dA, G_in = _bwd_chunk(cfg, G, S, x, dt, A, B, C, Ct, dy, _seg_input(cfg, r))
    for name, v in (("dx", dx), ("ddt", ddt), ("dB", dB), ("dC", dC)):
        r[name][...] = v.astype(r[name].dtype)
    r["dA"][...] += dA.astype(r["dA"].dtype)
    g_scr[...] = G_in

    @pl.when(step == cfg.n_chunks - 1)
    def _():
        r["dh0"][...] = G_in.astype(r["dh0"].dtype)


# --- pallas_call wrappers on the kernel layout ----------------------------------------------------
# x: (b, h, L, p)   dt: (b, h, 1, L)   A: (h, 1, 1)   B, C: (b, g, L, n)   Bt, Ct: (b, g, n, L)
# seg: (b, 1, L) | None   h0: (b, h, n, p)   with L = n_chunks * chunk (already padded).


def _specs(cfg: _Config, reverse: bool):
    T, n, p, nc = cfg.chunk, cfg.n, cfg.p, cfg.n_chunks
    S = _SQUEEZED
    c = (lambda ci: nc - 1 - ci) if reverse else (lambda ci: ci)
    # group of a head; lax.div (not `//`, whose floor semantics lower through `sign`) — non-negative ints
    hpg = cfg.heads_per_group
    grp = (lambda hi: hi) if hpg == 1 else (lambda hi: jax.lax.div(hi, jnp.asarray(hpg, hi.dtype)))
    seq_p = pl.BlockSpec((S, S, T, p), lambda bi, hi, ci: (bi, hi, c(ci), 0))
    seq_n = pl.BlockSpec((S, S, T, n), lambda bi, hi, ci: (bi, hi, c(ci), 0))
    bc = pl.BlockSpec((S, S, T, n), lambda bi, hi, ci: (bi, grp(hi), c(ci), 0))
    bc_t = pl.BlockSpec((S, S, n, T), lambda bi, hi, ci: (bi, grp(hi), 0, c(ci)))

    state = pl.BlockSpec((S, S, n, p), lambda bi, hi, ci: (bi, hi, 0, 0))
    return dict(
        x=seq_p, y=seq_p, dy=seq_p, dx=seq_p,
        dt=pl.BlockSpec((S, S, 1, T), lambda bi, hi, ci: (bi, hi, 0, c(ci))),
        A=pl.BlockSpec((S, 1, 1), lambda bi, hi, ci: (hi, 0, 0)),
        B=bc, C=bc, Bt=bc_t, Ct=bc_t, dB=seq_n, dC=seq_n,
        seg=pl.BlockSpec((S, 1, T), lambda bi, hi, ci: (bi, 0, c(ci))),
        h0=state, h_last=state, dh_last=state, dh0=state,
        h_starts=pl.BlockSpec((S, S, S, n, p), lambda bi, hi, ci: (bi, hi, c(ci), 0, 0)),
    )


def _call(kernel, cfg: _Config, interpret, name, grid, reverse, inputs, outputs):
    """pallas_call over named inputs {name: array or None} and outputs {name: ShapeDtypeStruct}."""
    specs = _specs(cfg, reverse)
    in_names = tuple(k for k, v in inputs.items() if v is not None)
    out_names = tuple(outputs)
    # the dA partial sums: (b, h, 1, 1) blocks (1, 1) revisited along the chunk axis
    specs["ddt"] = specs["dt"]
    specs["dA"] = pl.BlockSpec((_SQUEEZED, _SQUEEZED, 1, 1), lambda bi, hi, ci: (bi, hi, 0, 0))
    outs = pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=in_names + out_names),
        out_shape=tuple(outputs.values()),
        grid=grid,
        in_specs=[specs[k] for k in in_names],
        out_specs=tuple(specs[k] for k in out_names),
        scratch_shapes=[pltpu.VMEM((cfg.n, cfg.p), cfg.dtype)],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name=name,
    )(*(inputs[k] for k in in_names))
    return dict(zip(out_names, outs))


def _forward_call(cfg: _Config, interpret, x, dt, A, B, C, seg, h0, save_starts: bool):
    """Returns y (b, h, L, p) in the compute dtype, h_last (b, h, n, p) and, with `save_starts`, h_starts
    (b, h, n_chunks, n, p) (else None)."""
    b, h, L, p = x.shape
    n, cd = cfg.n, cfg.dtype
    inputs = dict(x=x, dt=dt, A=A, C=C, Bt=jnp.swapaxes(B, 2, 3), seg=seg, h0=h0)
    outputs = dict(y=jax.ShapeDtypeStruct((b, h, L, p), cd), h_last=jax.ShapeDtypeStruct((b, h, n, p), cd))
    if save_starts:
        outputs["h_starts"] = jax.ShapeDtypeStruct((b, h, cfg.n_chunks, n, p), cd)
    o = _call(_fwd_kernel, cfg, interpret, "ssd_fwd", (b, h, cfg.n_chunks), False, inputs, outputs)
    return o["y"], o["h_last"], o.get("h_starts")


def _backward_call(cfg: _Config, interpret, x, dt, A, B, C, seg, h_starts, dy, dh_last):
    """Returns a dict of dx (b, h, L, p), ddt (b, h, 1, L), per-head dB, dC (b, h, L, n), per-batch-row
    dA (b, h, 1, 1) and dh0 (b, h, n, p)."""
    b, h, L, p = x.shape
    n, cd = cfg.n, cfg.dtype
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, Ct=jnp.swapaxes(C, 2, 3), seg=seg,
                  h_starts=h_starts, dy=dy, dh_last=dh_last)
    outputs = dict(dx=jax.ShapeDtypeStruct((b, h, L, p), x.dtype), ddt=jax.ShapeDtypeStruct((b, h, 1, L), dt.dtype),
                   dB=jax.ShapeDtypeStruct((b, h, L, n), cd), dC=jax.ShapeDtypeStruct((b, h, L, n), cd),
                   dA=jax.ShapeDtypeStruct((b, h, 1, 1), cd), dh0=jax.ShapeDtypeStruct((b, h, n, p), cd))
    return _call(_bwd_kernel, cfg, interpret, "ssd_bwd", (b, h, cfg.n_chunks), True, inputs, outputs)


# --- custom VJP on the kernel layout --------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd_core(cfg, interpret, x, dt, A, B, C, seg, h0):
    y, h_last, _ = _calls(cfg)[0](cfg, interpret, x, dt, A, B, C, seg, h0, save_starts=False)
    return y, h_last


def _ssd_core_fwd(cfg, interpret, x, dt, A, B, C, seg, h0):
    y, h_last, h_starts = _calls(cfg)[0](cfg, interpret, x, dt, A, B, C, seg, h0, save_starts=True)
    return (y, h_last), (x, dt, A, B, C, seg, h_starts, h0)


def _ssd_core_bwd(cfg, interpret, residuals, cotangents):
    x, dt, A, B, C, seg, h_starts, h0 = residuals
    dy, dh_last = cotangents
    o = _calls(cfg)[1](cfg, interpret, x, dt, A, B, C, seg, h_starts, dy.astype(cfg.dtype),
                       dh_last.astype(cfg.dtype))
    b, g, L, n = B.shape
    per_group = lambda v: v.reshape(b, g, cfg.heads_per_group, L, n).sum(2)
    zero = lambda v: None if v is None else jnp.zeros_like(v)
    return (o["dx"], o["ddt"], o["dA"].sum(0).astype(A.dtype), per_group(o["dB"]).astype(B.dtype),
            per_group(o["dC"]).astype(C.dtype), zero(seg), o["dh0"].astype(h0.dtype))


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


# --- public entry point ---------------------------------------------------------------------------


def _kernel_inputs(cd, chunk: int, n_to: int, p_to: int, x, dt, A, B, C, initial_state, seq_idx):
    """The inputs in the kernel layout (see the module docstring), the sequence padded to a multiple of
    `chunk` and the state dims zero-padded to n_to ≥ n, p_to ≥ p (exact: padded B/C columns and x
    columns keep the padded state rows/columns at zero)."""
    b, l, h, p = x.shape
    n = B.shape[3]
    n_chunks = -(-l // chunk)
    L = n_chunks * chunk
    seg = None
    if seq_idx is not None:
        # segment number (+1 at every change of seq_idx), made relative to the segment the chunk starts
        # in (the state entering the chunk survives while it is 0): small exact integers in cd
        changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
        seg_g = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(changes, axis=1)], axis=1)
        seg_g = jnp.pad(seg_g, ((0, 0), (0, L - l)), mode="edge").reshape(b, n_chunks, chunk)
        prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), seg_g[:, :-1, -1]], axis=1)  # before each chunk
        seg = (seg_g - prev[..., None]).astype(cd).reshape(b, 1, L)

    def pad(v, *axes_lengths):
        for axis, length in axes_lengths:
            v = zero_pad_axis(v, axis, length)
        return v

    xk = pad(jnp.transpose(x, (0, 2, 1, 3)), (2, L), (3, p_to))  # (b, h, L, p)
    dtk = pad(jnp.transpose(dt, (0, 2, 1)), (2, L))[:, :, None, :]  # (b, h, 1, L); padded steps Δ = 0
    Bk = pad(jnp.transpose(B, (0, 2, 1, 3)), (2, L), (3, n_to))  # (b, g, L, n)
    Ck = pad(jnp.transpose(C, (0, 2, 1, 3)), (2, L), (3, n_to))
    Ak = A.astype(cd).reshape(h, 1, 1)
    h0 = (jnp.zeros((b, h, n_to, p_to), cd) if initial_state is None
          else pad(jnp.swapaxes(initial_state, 2, 3).astype(cd), (2, n_to), (3, p_to)))  # (b, h, n, p)
    return (xk, dtk, Ak, Bk, Ck, seg, h0), n_chunks


def _pow2_at_least(v: int, low: int) -> int:
    return max(low, 1 << (v - 1).bit_length())


def _run(variant: str, interpret, cd, bs: BlockSizes, x, dt, A, B, C, initial_state, seq_idx):
    """One variant end to end: layout, kernels, and back to y (b, l, h, p), final state (b, h, p, n)."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if variant == "triton":
        # Triton: power-of-two tensor sizes, matmul dims ≥ 16
        chunk, n_to, p_to = bs.triton_chunk(l), _pow2_at_least(n, 16), _pow2_at_least(p, 16)
    else:
        chunk, n_to, p_to = bs.fit(l).chunk, n, p
    args, n_chunks = _kernel_inputs(cd, chunk, n_to, p_to, x, dt, A, B, C, initial_state, seq_idx)
    cfg = _Config(n_chunks=n_chunks, chunk=chunk, n=n_to, p=p_to, heads_per_group=h // g, dtype=cd,
                  has_seg=seq_idx is not None, variant=variant)
    y, h_last = _ssd_core(cfg, interpret, *args)
    y = jnp.transpose(y[:, :, :l, :p], (0, 2, 1, 3))
    return y, jnp.swapaxes(h_last[:, :, :n, :p], 2, 3)


VARIANTS = ("tpu", "triton")


def ssd_scan(x, dt, A, B, C, initial_state=None, seq_idx=None, block_sizes: Optional[BlockSizes] = None,
             interpret=None, variant: Optional[str] = None):
    """The SSD recurrence with the Pallas kernels; differentiable (reverse mode) through a custom VJP.

    Args:
      x: (b, l, h, p) input.
      dt: (b, l, h) discretised time steps Δ (dt_bias and softplus already applied).
      A: (h,) decay per head.
      B, C: (b, l, g, n) with g groups dividing h (head i uses group i // (h/g)).
      initial_state: optional (b, h, p, n) state before the first step.
      seq_idx: optional (b, l) integer ids of packed sequences; the state resets to zero wherever the id
        changes from one position to the next (the first segment starts from `initial_state`).
      block_sizes: `BlockSizes` (default chunk 256), fitted to the problem by `BlockSizes.fit` (TPU
        variant) or `BlockSizes.triton_chunk` (Triton variant).
      interpret: passed to `pl.pallas_call`. None (with `variant=None`): chosen per platform when the
        function is lowered (`jax.lax.platform_dependent`): the compiled Mosaic kernel for TPU, the
        compiled Triton kernel for CUDA GPUs, the TPU variant interpreted elsewhere (CPU).
        `pltpu.InterpretParams()` interprets with TPU semantics.
      variant: None (per platform, as above), "tpu" or "triton": that variant's kernels, compiled unless
        `interpret` says otherwise (`variant="triton", interpret=True` runs the GPU kernels interpreted
        on any host — how they are tested on CPU).

    Returns:
      (y, final_states): y (b, l, h, p) *without* the D skip and z gate, and the (b, h, p, n) state after
      the last step, both in the compute dtype: float32 for float32/bf16/fp16 inputs, float64 when an input
      is float64 (y stays unrounded for the elementwise epilogue, which casts once to the input dtype).

    `mamba_jax.ops.ssd(impl="pallas")` validates the inputs, applies dt_bias/softplus, calls this, and adds
    D and the z gate; use it for the full SSD contract.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"ssd (pallas): {g} B/C groups must divide h={h}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"ssd (pallas): `variant` must be None or one of {VARIANTS}; got {variant!r}")
    cd = jnp.dtype(jnp.result_type(jnp.float32, *[v.dtype for v in (x, dt, A, B, C, initial_state)
                                                  if v is not None]))
    bs = block_sizes or BlockSizes()
    args = (x, dt, A, B, C, initial_state, seq_idx)
    if variant is None and interpret is None:
        # chosen when lowering, not when tracing: compiling for a TPU (even AOT from a CPU host) takes the
        # Mosaic kernel, for a CUDA GPU the Triton one, every other platform the interpreted TPU variant
        return jax.lax.platform_dependent(
            *args,
            tpu=functools.partial(_run, "tpu", False, cd, bs),
            cuda=functools.partial(_run, "triton", False, cd, bs),
            default=functools.partial(_run, "tpu", True, cd, bs))
    return _run(variant or "tpu", False if interpret is None else interpret, cd, bs, *args)
