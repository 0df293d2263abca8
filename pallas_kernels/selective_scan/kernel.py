"""Mamba-1 selective scan as Pallas kernels (TPU / Mosaic layout), forward and backward.

    Δ_t = softplus(delta_t + delta_bias)  (or without softplus)       per channel
    h_t = exp(Δ_t A)·keep_t ⊙ h_{t-1} + Δ_t u_t B_t                    state h: (d, n)
    y_t = (C_t · h_t + D u_t) ⊙ silu(z_t)

Everything above happens inside the kernels; the jnp code around them only changes layouts, pads the
sequence and sums per-block partial gradients.

Two variants share the per-step math of `step.py` (`_Step`, `_fwd_step`, `_bwd_step`) and the custom VJP
(`_scan_core`, which picks the variant's pallas_calls by `_Config.variant`): this file's TPU (Mosaic)
layout, and the GPU (Triton) layout in `triton_kernel.py` (one program walks the whole sequence; block
sizes and padding differ, see there). `selective_scan(variant=None)` picks per platform when lowering.

Layout (one program = one batch row × one channel block × one sequence block):

- grid (b, d // block_d, l_pad // block_l); the sequence axis is last and sequential ("arbitrary" on TPU),
  batch and channel blocks are "parallel".
- the state is held transposed, (n, block_d): channels on the 128 TPU lanes, the n state entries on
  sublanes. It lives in a VMEM scratch buffer, in float32 (float64 for float64 inputs, interpret mode
  only), carried from one sequence block to the next.
- u, delta, z, y: (b, l, d) blocks (block_l, block_d). A is passed as Aᵀ (n, d), blocks (n, block_d).
  B, C are passed as (b, g, l, n) blocks (block_l, n); a channel block lies inside one group.
  D, delta_bias: (1, d). seq_idx becomes keep (b, l, 1): 0 where a packed sequence starts.
- inside a program, `lax.fori_loop` over the block's time steps, one row (1, block_d) at a time.
- the forward writes the state at the start of every sequence block, (b, n_lblocks, n, d): the only
  residual of size ∝ n besides the inputs (O(b·d·n·l/block_l), not O(b·l·d·n)).
- the backward runs the sequence grid in reverse. Each program recomputes its block's states from
  the saved start state into a VMEM scratch (block_l, n, block_d), then runs the reverse recurrence
  (g_t = C_t dy_t + a_{t+1} g_{t+1}) carrying g in VMEM across sequence blocks. dB/dC are written per
  channel block (b, d/block_d, l, n) and summed per group outside; dA, dD, d(delta_bias) are
  accumulated per (batch row, channel block) across the sequence and summed over the batch outside.

Padding: a sequence not divisible by block_l is padded; padded steps get Δ = 0 inside the kernel
(exp(0·A) = 1, ΔuB = 0: the state passes through unchanged) whatever delta_bias/softplus would give,
and their outputs are sliced away.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan.blocks import BlockSizes
from pallas_kernels.selective_scan.step import (_SQUEEZED, _backward_io, _bwd_init, _bwd_step, _Config, _Consts,
                                               _fwd_step, _Refs, zero_pad_axis)

def _compiler_params():
    """TPU compiler params: batch and channel blocks parallel, the sequence axis sequential."""
    params_cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return params_cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


# --- forward --------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, names):
    r = _Refs(refs, *names)
    (h_scr,) = r.scratch
    cd = cfg.dtype
    lblock = pl.program_id(2)

    @pl.when(lblock == 0)
    def _():
        h_scr[...] = r["h0"][...].astype(cd)

    r["h_starts"][...] = h_scr[...]  # state before this block's first step, kept for the backward
    c = _Consts(cfg, r)
    body = lambda t, h: _fwd_step(cfg, r, c, t, lblock, h)

    h = jax.lax.fori_loop(0, cfg.block_l, body, h_scr[...])
    h_scr[...] = h
    r.flush()

    @pl.when(lblock == cfg.n_lblocks - 1)
    def _():
        r["h_last"][...] = h.astype(r["h_last"].dtype)


# --- backward -------------------------------------------------------------------------------------


def _bwd_kernel(*refs, cfg: _Config, names):
    r = _Refs(refs, *names)
    hs_scr, g_scr = r.scratch
    cd = cfg.dtype
    step_idx = pl.program_id(2)
    lblock = cfg.n_lblocks - 1 - step_idx  # the sequence grid runs in reverse

    @pl.when(step_idx == 0)
    def _():
        g_scr[...] = r["dh_last"][...].astype(cd)
        for name in ("dAt", "dD", "dbias"):
            r[name][...] = jnp.zeros(r[name].shape, r[name].dtype)

    c = _Consts(cfg, r)

    # 1. recompute this block's states from its saved start state: hs[t] = state before step t
    def fwd_body(t, h):
        hs_scr[t] = h
        return c.step(cfg, r, t, lblock).advance(h)

    jax.lax.fori_loop(0, cfg.block_l, fwd_body, r["h_starts"][...].astype(cd))

    # 2. reverse recurrence; g_next is the cotangent reaching h_t from step t+1 (a_{t+1} g_{t+1})
    def bwd_body(i, carry):
        t = cfg.block_l - 1 - i
        return _bwd_step(cfg, r, c, t, lblock, hs_scr[t], carry)

    init = _bwd_init(cfg, g_scr[...])
    g, dA, dD, dbias = jax.lax.fori_loop(0, cfg.block_l, bwd_body, init)
    g_scr[...] = g
    r.flush()
    r["dAt"][...] += dA.astype(r["dAt"].dtype)
    r["dD"][...] += dD.astype(r["dD"].dtype)
    r["dbias"][...] += dbias.astype(r["dbias"].dtype)

    @pl.when(step_idx == cfg.n_lblocks - 1)
    def _():
        r["dh0"][...] = g.astype(r["dh0"].dtype)


# --- pallas_call wrappers on the kernel layout ----------------------------------------------------
# u, delta, z: (b, L, d)   At: (n, d)   Bt, Ct: (b, g, L, n)   D, bias: (1, d)   keep: (b, L, 1) | None
# h0: (b, n, d)   with L = n_lblocks * block_l (already padded).

_ROW_INPUTS = ("u", "delta", "B", "C", "z", "keep", "dy")  # read one time step (row) at a time
_ROW_OUTPUTS = ("y", "du", "ddelta", "dz", "dB", "dC")  # written one row at a time


def _specs(cfg: _Config, groups: int, d: int, reverse: bool):
    bl, bd, n, nl = cfg.block_l, cfg.block_d, cfg.n, cfg.n_lblocks
    blocks_per_group = d // groups // bd
    S = _SQUEEZED
    lb = (lambda li: nl - 1 - li) if reverse else (lambda li: li)
    # group of a channel block; lax.div (not `//`, whose floor semantics lower through `sign`, which
    # Mosaic only lowers on a real TPU) — the indices are non-negative, so truncation is the floor.
    grp = (lambda di: di) if blocks_per_group == 1 else (lambda di: jax.lax.div(di, blocks_per_group))
    seq = pl.BlockSpec((S, bl, bd), lambda bi, di, li: (bi, lb(li), di))
    bc = pl.BlockSpec((S, S, bl, n), lambda bi, di, li: (bi, grp(di), lb(li), 0))
    vec = pl.BlockSpec((1, bd), lambda bi, di, li: (0, di))
    state = pl.BlockSpec((S, n, bd), lambda bi, di, li: (bi, 0, di))
    part_vec = pl.BlockSpec((S, 1, bd), lambda bi, di, li: (bi, 0, di))
    return dict(
        u=seq, delta=seq, z=seq, y=seq, dy=seq, du=seq, ddelta=seq, dz=seq,
        At=pl.BlockSpec((n, bd), lambda bi, di, li: (0, di)), dAt=state,
        B=bc, C=bc,
        D=vec, bias=vec, dD=part_vec, dbias=part_vec,
        keep=pl.BlockSpec((S, bl, 1), lambda bi, di, li: (bi, lb(li), 0)),
        h0=state, h_last=state, dh_last=state, dh0=state,
        h_starts=pl.BlockSpec((S, S, n, bd), lambda bi, di, li: (bi, lb(li), 0, di)),
        dB=pl.BlockSpec((S, S, bl, n), lambda bi, di, li: (bi, di, lb(li), 0)),
        dC=pl.BlockSpec((S, S, bl, n), lambda bi, di, li: (bi, di, lb(li), 0)),
    )


def _call(kernel, cfg: _Config, interpret, name, grid, groups, d, reverse, inputs, outputs, scratch):
    """pallas_call over named inputs {name: array} and outputs {name: ShapeDtypeStruct}; returns a dict."""
    specs = _specs(cfg, groups, d, reverse)
    in_names = tuple(k for k, v in inputs.items() if v is not None)
    out_names = tuple(outputs)
    staged_in = tuple(k for k in in_names if k in _ROW_INPUTS and jnp.dtype(inputs[k].dtype) != cfg.dtype)
    staged_out = tuple(k for k in out_names if k in _ROW_OUTPUTS and jnp.dtype(outputs[k].dtype) != cfg.dtype)
    width = {k: (cfg.n if k in ("B", "C", "dB", "dC") else 1 if k == "keep" else cfg.block_d)
             for k in staged_in + staged_out}
    scratch = list(scratch) + [pltpu.VMEM((cfg.block_l, width[k]), cfg.dtype) for k in staged_in + staged_out]
    outs = pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=(in_names, out_names, staged_in, staged_out)),
        out_shape=tuple(outputs.values()),
        grid=grid,
        in_specs=[specs[k] for k in in_names],
        out_specs=tuple(specs[k] for k in out_names),
        scratch_shapes=scratch,
        compiler_params=_compiler_params(),
        interpret=interpret,
        name=name,
    )(*(inputs[k] for k in in_names))
    return dict(zip(out_names, outs))


def _forward_call(cfg: _Config, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h0, save_starts: bool = True):
    """Returns y (b, L, d) in u's dtype, h_last (b, n, d) and h_starts (b, n_lblocks, n, d) (written by
    every grid step whatever `save_starts` says)."""
    b, L, d = u.shape
    n, bd, cd = cfg.n, cfg.block_d, cfg.dtype
    inputs = dict(u=u, delta=delta, At=At, B=Bt, C=Ct, D=D, bias=bias, z=z, keep=keep, h0=h0)
    outputs = dict(y=jax.ShapeDtypeStruct((b, L, d), u.dtype), h_last=jax.ShapeDtypeStruct((b, n, d), cd),
                   h_starts=jax.ShapeDtypeStruct((b, cfg.n_lblocks, n, d), cd))
    o = _call(_fwd_kernel, cfg, interpret, "selective_scan_fwd", (b, d // bd, cfg.n_lblocks), Bt.shape[1], d,
              False, inputs, outputs, [pltpu.VMEM((n, bd), cd)])
    return o["y"], o["h_last"], o["h_starts"]


def _backward_call(cfg: _Config, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, dy, dh_last):
    """Returns a dict of du, ddelta, dz (b, L, d); per-channel-block dB, dC (b, d/block_d, L, n);
    per-batch-row dAt (b, n, d), dD, dbias (b, 1, d); dh0 (b, n, d)."""
    b, _, d = u.shape
    n, bd, cd = cfg.n, cfg.block_d, cfg.dtype
    nd = d // bd
    inputs, outputs = _backward_io(cfg, u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, dy, dh_last)
    return _call(_bwd_kernel, cfg, interpret, "selective_scan_bwd", (b, nd, cfg.n_lblocks), Bt.shape[1], d,
                 True, inputs, outputs, [pltpu.VMEM((cfg.block_l, n, bd), cd), pltpu.VMEM((n, bd), cd)])


# --- custom VJP on the kernel layout --------------------------------------------------------------


def _calls(cfg: _Config):
    """The (forward, backward) pallas_call wrappers of cfg's variant."""
    if cfg.variant == "triton":
        from pallas_kernels.selective_scan import triton_kernel

        return triton_kernel.forward_call, triton_kernel.backward_call
    return _forward_call, _backward_call


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_core(cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h0):
    y, h_last, _ = _calls(cfg)[0](cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h0, save_starts=False)
    return y, h_last


def _scan_core_fwd(cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h0):
    y, h_last, h_starts = _calls(cfg)[0](cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h0)
    return (y, h_last), (u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, h0)


def _scan_core_bwd(cfg, interpret, residuals, cotangents):
    u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, h0 = residuals
    dy, dh_last = cotangents
    o = _calls(cfg)[1](cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h_starts,
                       dy, dh_last.astype(cfg.dtype))
    du, ddelta, dz = o["du"], o["ddelta"], o.get("dz")
    dB_part, dC_part, dA_part, dD_part, dbias_part, dh0 = (o[k] for k in ("dB", "dC", "dAt", "dD", "dbias", "dh0"))
    b, groups, L, n = Bt.shape
    per_group = dB_part.shape[1] // groups
    dBt = dB_part.reshape(b, groups, per_group, L, n).sum(2).astype(Bt.dtype)
    dCt = dC_part.reshape(b, groups, per_group, L, n).sum(2).astype(Ct.dtype)
    dAt = dA_part.sum(0).astype(At.dtype)
    dD = dD_part.sum(0).astype(D.dtype)
    dbias = dbias_part.sum(0).astype(bias.dtype)
    dkeep = None if keep is None else jnp.zeros_like(keep)
    return du, ddelta, dAt, dBt, dCt, dD, dbias, dz, dkeep, dh0.astype(h0.dtype)


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)


# --- public entry point ---------------------------------------------------------------------------

VARIANTS = ("tpu", "triton")


def _pow2_at_least(v: int) -> int:
    return 1 << (v - 1).bit_length()


def _run(variant: str, interpret, cd, bs: BlockSizes, softplus: bool, u, delta, A, B, C, D, z, delta_bias,
         initial_state, seq_idx):
    """One variant end to end: layout and padding, kernels, and back to y (b, l, d), h_last (b, d, n).

    TPU: block_d divides the channels per group (`BlockSizes.fit`), nothing but the sequence is padded.
    Triton: block_d is a power of two (`BlockSizes.triton_block_d`), each group's channels are
    zero-padded to a multiple of it and n to a power of two (padded channels and state rows stay zero)."""
    b, l, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None, :], C[:, :, None, :]
    groups = B.shape[2]
    dg = d // groups
    fitted = bs.fit(l, dg)
    if variant == "triton":
        block_d = bs.triton_block_d(dg)
        dgp, n_p = -(-dg // block_d) * block_d, _pow2_at_least(n)
    else:
        block_d, dgp, n_p = fitted.block_d, dg, n
    block_l = fitted.block_l
    n_lblocks = -(-l // block_l)
    L = n_lblocks * block_l
    cfg = _Config(seq_len=l, n_lblocks=n_lblocks, block_l=block_l, block_d=block_d, n=n_p, dtype=cd,
                  softplus=bool(softplus), has_z=z is not None, has_keep=seq_idx is not None, variant=variant)

    def pad_ch(x, axis):
        """Zero-pads the channels of every group (axis of size d) from dg to dgp."""
        if dgp == dg:
            return x
        axis %= x.ndim
        x = x.reshape(x.shape[:axis] + (groups, dg) + x.shape[axis + 1:])
        x = zero_pad_axis(x, axis + 1, dgp)
        return x.reshape(x.shape[:axis] + (groups * dgp,) + x.shape[axis + 2:])

    def unpad_ch(x, axis):
        if dgp == dg:
            return x
        axis %= x.ndim
        x = x.reshape(x.shape[:axis] + (groups, dgp) + x.shape[axis + 1:])
        x = jax.lax.slice_in_dim(x, 0, dg, axis=axis + 1)
        return x.reshape(x.shape[:axis] + (d,) + x.shape[axis + 2:])

    seq = lambda x: pad_ch(zero_pad_axis(x, 1, L), 2)  # (b, l, d) -> (b, L, groups·dgp)

    keep = None
    if seq_idx is not None:
        changed = seq_idx[:, 1:] != seq_idx[:, :-1]
        keep = jnp.concatenate([jnp.ones((b, 1), bool), ~changed], axis=1).astype(cd)
        keep = jnp.pad(keep, ((0, 0), (0, L - l)), constant_values=1)[..., None]  # (b, L, 1)

    At = zero_pad_axis(pad_ch(A.T, 1), 0, n_p)  # (n, d): channels on lanes
    Bt = zero_pad_axis(zero_pad_axis(jnp.swapaxes(B, 1, 2), 2, L), 3, n_p)  # (b, g, L, n)
    Ct = zero_pad_axis(zero_pad_axis(jnp.swapaxes(C, 1, 2), 2, L), 3, n_p)
    Dv = pad_ch((jnp.zeros((d,), cd) if D is None else D).reshape(1, d), 1)
    bias = pad_ch((jnp.zeros((d,), cd) if delta_bias is None else delta_bias).reshape(1, d), 1)
    h0 = (jnp.zeros((b, n_p, groups * dgp), cd) if initial_state is None
          else zero_pad_axis(pad_ch(jnp.swapaxes(initial_state, 1, 2).astype(cd), 2), 1, n_p))  # (b, n, d)
    args = (seq(u), seq(delta), At, Bt, Ct, Dv, bias, None if z is None else seq(z), keep, h0)
    y, h_last = _scan_core(cfg, interpret, *args)
    y = unpad_ch(y[:, :l], 2)
    h_last = unpad_ch(h_last[:, :n], 2)
    return y, jnp.swapaxes(h_last, 1, 2)


def selective_scan(
    u,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    initial_state=None,
    seq_idx=None,
    return_final_state: bool = False,
    block_sizes: Optional[BlockSizes] = None,
    interpret=None,
    variant: Optional[str] = None,
):
    """Mamba-1 selective scan with the Pallas kernels; differentiable (reverse mode) through a custom VJP.

    Args:
      u, dt: (b, l, d).  A: (d, n).
      B, C: (b, l, n), or grouped (b, l, g, n) with g dividing d (channel c uses group c // (d/g)).
      D, dt_bias: optional (d,).  z: optional (b, l, d) gate: y ← y ⊙ silu(z).
      dt_softplus: Δ = softplus(dt + dt_bias) instead of dt + dt_bias.
      initial_state: optional (b, d, n) state before the first step.
      seq_idx: optional (b, l) integer ids of packed sequences; the state resets to zero where the id
        changes from one position to the next.
      return_final_state: also return the (b, d, n) state after the last step.
      block_sizes: `BlockSizes` (default 128 channels × 128 steps), fitted to the problem by
        `BlockSizes.fit` (TPU variant; the Triton variant takes its sequence chunk from `fit` and its
        channel block from `BlockSizes.triton_block_d`).
      interpret: passed to `pl.pallas_call`. None (with `variant=None`): chosen per platform when the
        function is lowered (`jax.lax.platform_dependent`): the compiled Mosaic kernel for TPU, the
        compiled Triton kernel for CUDA GPUs, the TPU variant interpreted elsewhere (CPU).
        `pltpu.InterpretParams()` interprets with TPU semantics.
      variant: None (per platform, as above), "tpu" or "triton": that variant's kernels, compiled unless
        `interpret` says otherwise (`variant="triton", interpret=True` runs the GPU kernels interpreted
        on any host — how they are tested on CPU).

    Returns:
      y (b, l, d) in the dtype of `u`; with `return_final_state`, (y, last_state (b, d, n)) where the state
      is float32 for float32/bf16/fp16 inputs and float64 when an input is float64.

    Inputs are not validated beyond what the layout needs; `mamba_jax.ops.selective_scan(impl="pallas")`
    validates and then calls this.
    """
    d = u.shape[2]
    groups = 1 if B.ndim == 3 else B.shape[2]
    if d % groups:
        raise ValueError(f"selective_scan (pallas): {groups} B/C groups must divide d={d}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"selective_scan (pallas): `variant` must be None or one of {VARIANTS}; got {variant!r}")
    cd = jnp.dtype(jnp.result_type(jnp.float32, *[x.dtype for x in (u, dt, A, B, C, D, z, dt_bias,
                                                                     initial_state) if x is not None]))
    bs = block_sizes or BlockSizes()
    args = (u, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    run = lambda variant_, interpret_: functools.partial(_run, variant_, interpret_, cd, bs, dt_softplus)
    if variant is None and interpret is None:
        # Chosen when lowering, not when tracing: compiling for a TPU (even AOT, from a CPU host) takes
        # the Mosaic kernel, for a CUDA GPU the Triton one, every other platform the interpreted TPU one.
        y, h_last = jax.lax.platform_dependent(
            *args, tpu=run("tpu", False), cuda=run("triton", False), default=run("tpu", True))
    else:
        y, h_last = run(variant or "tpu", False if interpret is None else interpret)(*args)
    if return_final_state:
        return y, h_last
    return y
