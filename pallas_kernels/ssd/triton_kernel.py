"""Mamba-2 SSD chunked scan as Pallas kernels for GPUs (the Triton backend), forward and backward.

The chunk math is shared with the TPU variant (`step._fwd_chunk`, `step._bwd_chunk`: the same formulas, the
same precision); what differs is how programs are laid out, because Triton programs run in no order and
have no scratch memory carried from one grid step to the next:

- grid (b, h): one program per batch row and head walks all the chunks of the sequence itself, in a
  `lax.fori_loop` (in reverse for the backward), the float32 (n, p) state (the state cotangent in the
  backward, with the running dA sum) being the loop carry, i.e. registers.
- every block spans the whole padded sequence: x, y, dy, dx (L, p); Δ (1, L); B, C (L, n); seg (1, L);
  the loop loads and stores chunk slices `pl.ds(ci·T, T)`. B and C are transposed in registers
  (`tt.trans`), not in HBM.
- the forward writes the state entering every chunk, (b, h, n_chunks, n, p), for the backward, as the TPU
  variant does; the backward reads one per chunk.
- Triton tensors need power-of-two sizes and its matmuls at least 16 in every dimension: the chunk is a
  power of two in [16, 64] (`BlockSizes.triton_chunk`; (T, T) float32 tiles live in registers, so the
  TPU default of 256 would spill), and p and n are zero-padded to a power of two ≥ 16 (exact: padded
  state rows/columns stay zero and are sliced away).

Verified on a CPU host only (tests/kernels/test_triton_ssd.py): interpreted (`interpret=True`) against
the reference in values and gradients, and lowered for CUDA (`pallas_kernels.gpu_lowering`), which runs
the Pallas → Triton IR lowering. Triton's compilation of that IR and any timing need a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu_lowering import triton_call
from pallas_kernels.selective_scan.step import _SQUEEZED
from pallas_kernels.ssd.step import _bwd_chunk, _fwd_chunk, _named

NUM_WARPS = 4


def _specs(cfg, L: int):
    """Whole-sequence blocks for grid (b, h)."""
    n, p, nc = cfg.n, cfg.p, cfg.n_chunks
    S = _SQUEEZED
    hpg = cfg.heads_per_group
    grp = (lambda hi: hi) if hpg == 1 else (lambda hi: jax.lax.div(hi, jnp.asarray(hpg, hi.dtype)))
    seq_p = pl.BlockSpec((S, S, L, p), lambda bi, hi: (bi, hi, 0, 0))
    seq_n = pl.BlockSpec((S, S, L, n), lambda bi, hi: (bi, hi, 0, 0))
    bc = pl.BlockSpec((S, S, L, n), lambda bi, hi: (bi, grp(hi), 0, 0))
    row = pl.BlockSpec((S, S, 1, L), lambda bi, hi: (bi, hi, 0, 0))
    state = pl.BlockSpec((S, S, n, p), lambda bi, hi: (bi, hi, 0, 0))
    return dict(
        x=seq_p, y=seq_p, dy=seq_p, dx=seq_p, dt=row, ddt=row,
        A=pl.BlockSpec((S, 1, 1), lambda bi, hi: (hi, 0, 0)),
        B=bc, C=bc, dB=seq_n, dC=seq_n,
        seg=pl.BlockSpec((S, 1, L), lambda bi, hi: (bi, 0, 0)),
        h0=state, h_last=state, dh_last=state, dh0=state,
        h_starts=pl.BlockSpec((S, S, nc, n, p), lambda bi, hi: (bi, hi, 0, 0, 0)),
        dA=pl.BlockSpec((S, S, 1, 1), lambda bi, hi: (bi, hi, 0, 0)),
    )


def _chunk_inputs(cfg, r, ci, names):
    """Chunk ci's slices of the named inputs, in the compute dtype: (T, ·) sequence blocks, (1, T) rows."""
    T, cd = cfg.chunk, cfg.dtype
    t = pl.ds(pl.multiple_of(ci * T, T), T)
    out = {}
    for name in names:
        ref = r[name]
        out[name] = (ref[:, t] if name in ("dt", "seg") else ref[t, :]).astype(cd)
    if not cfg.has_seg:
        out["seg"] = None
    return out, t


def _fwd_kernel(*refs, cfg, names):
    r = _named(refs, names)
    cd = cfg.dtype
    A = r["A"][...].astype(cd)
    loads = ("x", "dt", "B", "C") + (("seg",) if cfg.has_seg else ())

    def body(ci, S):
        v, t = _chunk_inputs(cfg, r, ci, loads)
        if "h_starts" in r:
            r["h_starts"][ci] = S.astype(r["h_starts"].dtype)
        y, S = _fwd_chunk(cfg, S, v["x"], v["dt"], A, v["C"], v["B"].T, v["seg"])
        r["y"][t, :] = y.astype(r["y"].dtype)
        return S

    S = jax.lax.fori_loop(0, cfg.n_chunks, body, r["h0"][...].astype(cd))
    r["h_last"][...] = S.astype(r["h_last"].dtype)


def _bwd_kernel(*refs, cfg, names):
    r = _named(refs, names)
    cd = cfg.dtype
    A = r["A"][...].astype(cd)
    loads = ("x", "dt", "B", "C", "dy") + (("seg",) if cfg.has_seg else ())

    def body(step, carry):
        G, dA = carry
        ci = cfg.n_chunks - 1 - step
        v, t = _chunk_inputs(cfg, r, ci, loads)
        S = r["h_starts"][ci].astype(cd)
        dx, ddt, dB, dC, dA_c, G = _bwd_chunk(cfg, G, S, v["x"], v["dt"], A, v["B"], v["C"], v["C"].T,
                                              v["dy"], v["seg"])
        r["dx"][t, :] = dx.astype(r["dx"].dtype)
        r["ddt"][:, t] = ddt.astype(r["ddt"].dtype)
        r["dB"][t, :] = dB.astype(r["dB"].dtype)
        r["dC"][t, :] = dC.astype(r["dC"].dtype)
        return G, dA + dA_c

    G, dA = jax.lax.fori_loop(0, cfg.n_chunks, body,
                              (r["dh_last"][...].astype(cd), jnp.zeros((1, 1), cd)))
    r["dh0"][...] = G.astype(r["dh0"].dtype)
    r["dA"][...] = dA.astype(r["dA"].dtype)


def _call(kernel, cfg, interpret, name, inputs, outputs):
    b, h, L, _ = inputs["x"].shape
    return triton_call(lambda i, o: functools.partial(kernel, cfg=cfg, names=i + o), inputs, outputs,
                       _specs(cfg, L), (b, h), name=name, interpret=interpret, num_warps=NUM_WARPS)


def forward_call(cfg, interpret, x, dt, A, B, C, seg, h0, save_starts: bool):
    """`kernel._forward_call` for the Triton layout (same arguments and results)."""
    b, h, L, p = x.shape
    n, cd = cfg.n, cfg.dtype
    outputs = dict(y=jax.ShapeDtypeStruct((b, h, L, p), cd), h_last=jax.ShapeDtypeStruct((b, h, n, p), cd))
    if save_starts:
        outputs["h_starts"] = jax.ShapeDtypeStruct((b, h, cfg.n_chunks, n, p), cd)
    o = _call(_fwd_kernel, cfg, interpret, "ssd_fwd_triton",
              dict(x=x, dt=dt, A=A, B=B, C=C, seg=seg, h0=h0), outputs)
    return o["y"], o["h_last"], o.get("h_starts")


def backward_call(cfg, interpret, x, dt, A, B, C, seg, h_starts, dy, dh_last):
    """`kernel._backward_call` for the Triton layout (same arguments and results)."""
    b, h, L, p = x.shape
    n, cd = cfg.n, cfg.dtype
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, seg=seg, h_starts=h_starts, dy=dy, dh_last=dh_last)
    outputs = dict(dx=jax.ShapeDtypeStruct((b, h, L, p), x.dtype), ddt=jax.ShapeDtypeStruct((b, h, 1, L), dt.dtype),
                   dB=jax.ShapeDtypeStruct((b, h, L, n), cd), dC=jax.ShapeDtypeStruct((b, h, L, n), cd),
                   dA=jax.ShapeDtypeStruct((b, h, 1, 1), cd), dh0=jax.ShapeDtypeStruct((b, h, n, p), cd))
    return _call(_bwd_kernel, cfg, interpret, "ssd_bwd_triton", inputs, outputs)
