"""Mamba-1 selective scan as Pallas kernels for GPUs (the Triton backend), forward and backward.

The per-step math is shared with the TPU variant (`step._fwd_step`, `step._bwd_step`, `step._Step`: the same
formulas, the same precision, the same residuals); what differs is how programs are laid out, because
Triton programs run in no order and have no scratch memory carried from one grid step to the next:

- grid (b, d // block_d): one program per batch row and channel block walks the whole sequence itself,
  chunk by chunk (T = block_l steps), in nested `lax.fori_loop`s; the float32 (n, block_d) state is the
  loop carry, i.e. registers.
- every sequence block spans the whole padded sequence: u, delta, z, y (L, block_d), B, C (L, n),
  keep (L, 1); the loop reads and writes single rows `pl.ds(t, 1)`.
- the forward writes the state entering every chunk, (b, n_chunks, n, d), as the TPU variant does
  (no O(l·d·n) residuals).
- the backward walks the chunks in reverse. For each chunk it recomputes the chunk's T states forward from
  the saved chunk-start state into a per-program workspace in global memory (an extra, discarded kernel
  output (b, d/block_d, T, n, block_d): Triton has no addressable on-chip scratch), then steps backward
  through the chunk reading them; the state cotangent and the dA, dD, d(delta_bias) sums are loop
  carries (registers). `pallas.triton.debug_barrier()` (a CTA barrier, which also makes the block's
  global writes visible to its other threads) separates writing the workspace from reading it, and
  reading it from the next chunk's overwrite. Interpret mode has no lowering for the barrier and needs
  none (one program at a time, sequentially), so it is emitted only for compiled kernels.
- Triton tensors need power-of-two sizes: block_d is a power of two (`BlockSizes.triton_block_d`) and
  the channels of every B/C group are zero-padded to a multiple of it, n to a power of two (exact:
  padded channels have u = A = 0 and padded state rows B = C = A = 0, so their states stay zero; the
  padding is sliced away). There is no matmul, so no minimum of 16.

Verified on a CPU host only (tests/kernels/test_triton_selective_scan.py): interpreted (`interpret=True`)
against the reference in values and gradients, and lowered for CUDA (`pallas_kernels.gpu_lowering`),
which runs the Pallas → Triton IR lowering. Triton's compilation of that IR and any run or timing need a
GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.gpu_lowering import triton_call
from pallas_kernels.selective_scan.step import (
    _SQUEEZED,
    _backward_io,
    _bwd_init,
    _bwd_step,
    _Consts,
    _fwd_step,
    _Refs,
)

NUM_WARPS = 4


def _specs(cfg, L: int, groups: int, d: int):
    """Whole-sequence blocks for grid (b, d // block_d)."""
    T, bd, n, nc = cfg.block_l, cfg.block_d, cfg.n, cfg.n_lblocks
    S = _SQUEEZED
    blocks_per_group = d // groups // bd
    # group of a channel block; lax.div (not `//`, whose floor semantics lower through `sign`): ints ≥ 0
    grp = ((lambda di: di) if blocks_per_group == 1
           else (lambda di: jax.lax.div(di, jnp.asarray(blocks_per_group, di.dtype))))
    seq = pl.BlockSpec((S, L, bd), lambda bi, di: (bi, 0, di))
    bc = pl.BlockSpec((S, S, L, n), lambda bi, di: (bi, grp(di), 0, 0))
    vec = pl.BlockSpec((1, bd), lambda bi, di: (0, di))
    state = pl.BlockSpec((S, n, bd), lambda bi, di: (bi, 0, di))
    part_vec = pl.BlockSpec((S, 1, bd), lambda bi, di: (bi, 0, di))
    per_block = pl.BlockSpec((S, S, L, n), lambda bi, di: (bi, di, 0, 0))
    return dict(
        u=seq, delta=seq, z=seq, y=seq, dy=seq, du=seq, ddelta=seq, dz=seq,
        At=pl.BlockSpec((n, bd), lambda bi, di: (0, di)), dAt=state,
        B=bc, C=bc, dB=per_block, dC=per_block,
        D=vec, bias=vec, dD=part_vec, dbias=part_vec,
        keep=pl.BlockSpec((S, L, 1), lambda bi, di: (bi, 0, 0)),
        h0=state, h_last=state, dh_last=state, dh0=state,
        h_starts=pl.BlockSpec((S, nc, n, bd), lambda bi, di: (bi, 0, 0, di)),
        ws=pl.BlockSpec((S, S, T, n, bd), lambda bi, di: (bi, di, 0, 0, 0)),
    )


def _fwd_kernel(*refs, cfg, names):
    r = _Refs(refs, *names, (), ())
    cd, T = cfg.dtype, cfg.block_l
    c = _Consts(cfg, r)

    def chunk(ci, h):
        if "h_starts" in r:
            r["h_starts"][ci] = h.astype(r["h_starts"].dtype)  # the state entering chunk ci
        start = ci * T
        return jax.lax.fori_loop(0, T, lambda i, h: _fwd_step(cfg, r, c, start + i, 0, h), h)

    h = jax.lax.fori_loop(0, cfg.n_lblocks, chunk, r["h0"][...].astype(cd))
    r["h_last"][...] = h.astype(r["h_last"].dtype)


def _bwd_kernel(*refs, cfg, names, barrier: bool):
    r = _Refs(refs, *names, (), ())
    cd, T = cfg.dtype, cfg.block_l
    c = _Consts(cfg, r)
    ws = r["ws"]  # (T, n, bd): ws[i] = the state before step i of the current chunk
    sync = pltr.debug_barrier if barrier else (lambda: None)

    def chunk(step, carry):
        start = (cfg.n_lblocks - 1 - step) * T

        def recompute(i, h):
            ws[i] = h
            return c.step(cfg, r, start + i, 0).advance(h)

        jax.lax.fori_loop(0, T, recompute, r["h_starts"][cfg.n_lblocks - 1 - step].astype(cd))
        sync()  # the workspace writes are visible to every thread of the program

        def reverse(j, carry):
            i = T - 1 - j
            return _bwd_step(cfg, r, c, start + i, 0, ws[i], carry)

        carry = jax.lax.fori_loop(0, T, reverse, carry)
        sync()  # every read of this chunk's states is done before the next chunk overwrites them
        return carry

    g, dA, dD, dbias = jax.lax.fori_loop(0, cfg.n_lblocks, chunk, _bwd_init(cfg, r["dh_last"][...].astype(cd)))
    r["dAt"][...] = dA.astype(r["dAt"].dtype)
    r["dD"][...] = dD.astype(r["dD"].dtype)
    r["dbias"][...] = dbias.astype(r["dbias"].dtype)
    r["dh0"][...] = g.astype(r["dh0"].dtype)


def _call(kernel, cfg, interpret, name, groups, inputs, outputs):
    b, L, d = inputs["u"].shape
    return triton_call(lambda i, o: functools.partial(kernel, cfg=cfg, names=(i, o)), inputs, outputs,
                       _specs(cfg, L, groups, d), (b, d // cfg.block_d), name=name, interpret=interpret,
                       num_warps=NUM_WARPS)


def forward_call(cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h0, save_starts: bool = True):
    """`kernel._forward_call` for the Triton layout (same arguments and results; h_starts is None
    without `save_starts`)."""
    b, L, d = u.shape
    n, cd = cfg.n, cfg.dtype
    inputs = dict(u=u, delta=delta, At=At, B=Bt, C=Ct, D=D, bias=bias, z=z, keep=keep, h0=h0)
    outputs = dict(y=jax.ShapeDtypeStruct((b, L, d), u.dtype), h_last=jax.ShapeDtypeStruct((b, n, d), cd))
    if save_starts:
        outputs["h_starts"] = jax.ShapeDtypeStruct((b, cfg.n_lblocks, n, d), cd)
    o = _call(_fwd_kernel, cfg, interpret, "selective_scan_fwd_triton", Bt.shape[1], inputs, outputs)
    return o["y"], o["h_last"], o.get("h_starts")


def backward_call(cfg, interpret, u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, dy, dh_last):
    """`kernel._backward_call` for the Triton layout (same arguments and results)."""
    b, L, d = u.shape
    n, bd, cd = cfg.n, cfg.block_d, cfg.dtype
    inputs, outputs = _backward_io(cfg, u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, dy, dh_last)
    # the per-program workspace, discarded
    outputs["ws"] = jax.ShapeDtypeStruct((b, d // bd, cfg.block_l, n, bd), cd)
    barrier = interpret is None or interpret is False  # compiled: the CTA barrier; interpreted: none exists
    kernel = functools.partial(_bwd_kernel, barrier=barrier)
    o = _call(kernel, cfg, interpret, "selective_scan_bwd_triton", Bt.shape[1], inputs, outputs)
    del o["ws"]
    return o
