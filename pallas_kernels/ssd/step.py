"""The chunk math of the SSD kernels, shared by the TPU (Mosaic) variant in `kernel.py` and the GPU (Triton)
variant in `triton_kernel.py`: the static config, the in-kernel helpers and one chunk forward and backward."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.selective_scan.step import _to_col, _to_row  # shared helpers

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static facts every kernel body needs."""

    n_chunks: int
    chunk: int
    n: int
    p: int
    heads_per_group: int
    dtype: jnp.dtype  # state / compute dtype
    has_seg: bool
    variant: str = "tpu"  # "tpu": grid over chunks, VMEM state; "triton": one program walks the chunks



# --- in-kernel helpers ----------------------------------------------------------------------------


def _mm(a, b):
    """a @ b with full-precision accumulation in a's (compute) dtype."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=a.dtype)


def _mm_t(a, b):
    """a @ bᵀ (contract the last dims)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=a.dtype)


class _Chunk:
    """The decay terms of one chunk. dt: (1, T) Δ; A: (1, 1); seg: (1, T) chunk-relative segment ids
    (0 = the segment the chunk starts in) or None.

    Attributes: rows, cols (T, T) iotas; eye; dt (T, 1); cum (T, 1); cum_row (1, T); mask (T, T) (j ≤ i,
    same segment); L (T, T); e (T, 1); w (T, 1); decay (1, 1)."""

    def __init__(self, cfg: _Config, dt, A, seg):
        T, cd = cfg.chunk, cfg.dtype
        zero = jnp.zeros((), cd)
        self.rows = jax.lax.broadcasted_iota(jnp.int32, (T, T), 0)
        self.cols = jax.lax.broadcasted_iota(jnp.int32, (T, T), 1)
        self.eye = self.rows == self.cols
        causal = self.rows >= self.cols
        self.dt = _to_col(dt, self.eye)  # (T, 1)
        # cumulative log-decay by a masked lane reduction (no (T, T) @ (T, 1) matmul with a 1-wide result)
        self.cum = jnp.sum(jnp.where(causal, dt * A, zero), axis=1, keepdims=True)
        self.cum_row = _to_row(self.cum, self.eye)
        # the last step's values by masked reductions, not value slices (which the Triton lowering lacks)
        last_col = jax.lax.broadcasted_iota(jnp.int32, (T, 1), 0) == T - 1
        last_row = jax.lax.broadcasted_iota(jnp.int32, (1, T), 1) == T - 1
        cum_last = jnp.sum(jnp.where(last_col, self.cum, zero), axis=0, keepdims=True)  # (1, 1)
        if cfg.has_seg:
            seg_col = _to_col(seg, self.eye)
            self.same = seg_col == seg  # (T, T) same segment
            self.mask = causal & self.same
            e_keep = (seg_col == 0).astype(cd)  # no reset since the chunk started
            seg_last = jnp.sum(jnp.where(last_row, seg, zero), axis=1, keepdims=True)  # (1, 1)
            w_keep = (seg_col == seg_last).astype(cd)  # no reset until the chunk ends
        else:
            self.same = None
            self.mask = causal
            e_keep = w_keep = jnp.ones((T, 1), cd)
        self.L = jnp.where(self.mask, jnp.exp(jnp.where(self.mask, self.cum - self.cum_row, zero)), zero)
        self.e = jnp.exp(self.cum) * e_keep  # (T, 1): decay from the chunk start to step i
        self.w = jnp.exp(cum_last - self.cum) * w_keep  # (T, 1): decay from step j to the chunk end
        self.decay = jnp.sum(jnp.where(last_col, self.e, zero), axis=0, keepdims=True)  # (1, 1): the entering state's decay over the whole chunk

    def L_t(self):
        """Lᵀ (T, T), built directly (Lᵀ[j, i] = exp(cum_i − cum_j) for i ≥ j in the same segment)."""
        zero = jnp.zeros((), self.cum.dtype)
        mask_t = self.rows <= self.cols
        if self.same is not None:
            mask_t = mask_t & self.same
        return jnp.where(mask_t, jnp.exp(jnp.where(mask_t, self.cum_row - self.cum, zero)), zero)


def _named(refs, names):
    return dict(zip(names, refs))


def _load(r, name, cd):
    return r[name][...].astype(cd)


def _seg_input(cfg, r):
    return _load(r, "seg", cfg.dtype) if cfg.has_seg else None


# --- forward --------------------------------------------------------------------------------------


def _fwd_chunk(cfg: _Config, S, x, dt, A, C, Bt, seg):
    """One chunk of the forward. S: (n, p) state entering it; x (T, p); dt (1, T); A (1, 1); C (T, n);
    Bt (n, T); seg (1, T) or None. Returns y (T, p) and the state leaving the chunk (n, p), in cd."""
    k = _Chunk(cfg, dt, A, seg)
    xdt = x * k.dt  # (T, p)
    y = _mm(_mm(C, Bt) * k.L, xdt) + _mm(C, S) * k.e  # intra-chunk + entering-state contributions
    return y, k.decay * S + _mm(Bt, xdt * k.w)


# --- backward -------------------------------------------------------------------------------------


def _bwd_chunk(cfg: _Config, G, S, x, dt, A, B, C, Ct, dy, seg):
    """One chunk of the backward. G: (n, p) cotangent of the state leaving the chunk; S: (n, p) state
    entering it; x, dy (T, p); dt (1, T); A (1, 1); B, C (T, n); Ct (n, T); seg (1, T) or None.

    Returns dx (T, p), ddt (1, T), dB, dC (T, n), this chunk's dA term (1, 1) and the cotangent of the
    entering state (n, p), all in cd."""
    cd = cfg.dtype
    k = _Chunk(cfg, dt, A, seg)
    L_t = k.L_t()
    dt = k.dt  # (T, 1)
    xdt = x * dt
    CB_t = _mm(B, Ct)  # (T, T): [j, i] = B_j · C_i
    dM = _mm_t(dy, xdt)  # (T, T): dy_i · (Δx)_j, the cotangent of (C Bᵀ ∘ L)
    dM_t = _mm_t(xdt, dy)
    BG = _mm(B, G)  # (T, p)
    CS = _mm(C, S)  # (T, p)

    dxdt = _mm(CB_t * L_t, dy) + k.w * BG  # (T, p)
    dw = jnp.sum(xdt * BG, axis=1, keepdims=True)  # (T, 1)
    de = jnp.sum(dy * CS, axis=1, keepdims=True)
    ddecay = jnp.sum(jnp.sum(G * S, axis=1, keepdims=True), axis=0, keepdims=True)  # (1, 1)
    dC = _mm(dM * k.L, B) + _mm_t(dy * k.e, S)  # (T, n)
    dB = _mm(dM_t * L_t, C) + _mm_t(xdt * k.w, G)  # (T, n)
    G_in = k.decay * G + _mm(Ct, dy * k.e)  # (n, p) cotangent of the state entering this chunk

    # cotangent of the log-decays dA_k = Δ_k A, summed directly over the terms that depend on dA_k
    # (differencing cumulative sums would cancel catastrophically under strong decay, the reason for the
    # official `_chunk_scan_bwd_ddAcs_stable`):
    #   L[i, j] = exp(Σ_{j<k≤i} dA_k):  Σ_{i≥k>j} dL[i, j] L[i, j]     (one (T, T) @ (T, T) matmul)
    #   e_i = exp(Σ_{k≤i} dA_k): Σ_{i≥k} de_i e_i ;   w_j = exp(Σ_{j<k} dA_k): Σ_{j<k} dw_j w_j ;   decay: all k
    P_t = dM_t * CB_t * L_t  # (dL ∘ L)ᵀ
    strictly_lower = (k.rows > k.cols).astype(cd)
    i_ge_k = k.rows <= k.cols  # [row k, column i]: i ≥ k
    ddA = jnp.sum(jnp.where(i_ge_k, _mm(strictly_lower, P_t), jnp.zeros((), cd)), axis=1, keepdims=True)
    ddA = ddA + jnp.sum(jnp.where(i_ge_k, _to_row(de * k.e, k.eye), _to_row(dw * k.w, k.eye)), axis=1,
                        keepdims=True) + ddecay * k.decay

    ddt = jnp.sum(dxdt * x, axis=1, keepdims=True) + ddA * A  # (T, 1)
    dA = jnp.sum(ddA * dt, axis=0, keepdims=True)  # (1, 1)
    return dxdt * dt, _to_row(ddt, k.eye), dB, dC, dA, G_in
