"""Mamba-2 state-space duality (SSD): the selective scan with one scalar decay per head.

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ      (state per head: (p, n))
    y_t = h_t C_t + D x_t ;   y ← y ⊙ silu(z)

Implementations (same values and gradients):

- ``reference`` — the Mamba-1 `selective_scan` reference (`lax.scan`) on the heads flattened into
  channels: SSD is the special case where A is constant over a head's p channels and n states.
- ``chunked``   — the SSD chunked algorithm (Dao & Gu 2024): within each chunk of `chunk_size` an
  attention-like quadratic form with a numerically stable segment sum, between chunks a linear
  recurrence over the chunk-end states (`lax.scan`).
- ``pallas``    — the Pallas kernels of `pallas_kernels.ssd` (imported lazily): the chunked algorithm with
  the state carried in on-chip memory, forward and a backward kernel that recomputes each chunk from the
  chunk-start states the forward saved. dt_bias/softplus, D and the z gate stay here in plain JAX around
  the kernel. Two variants picked when lowering: Mosaic on TPU, Triton on CUDA GPUs (lowered from a CPU
  host in the tests, never run on a GPU yet); on CPU the TPU variant runs in Pallas interpret mode (how the
  kernels are gradient-checked without an accelerator). Not in `SSD_IMPLS` (the list the fast tests sweep);
  ``auto`` picks it on TPU only, not yet on GPU (`resolve_ssd_impl`).

State and decays are float32 for float32/bf16/fp16 inputs (float64 stays float64).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import check_array, compute_dtype
from mamba_jax.ops.positions import segment_ids
from mamba_jax.ops.selective_scan import selective_scan, time_step

SSD_IMPLS = ("reference", "chunked")

# impl="auto" per backend: the Pallas kernels on TPU; the jnp chunked algorithm elsewhere, GPUs included until a
# GPU run has verified the Triton variant (impl="pallas" selects it explicitly; see
# `selective_scan._AUTO_BY_BACKEND`).
_SSD_AUTO_BY_BACKEND = {"tpu": "pallas"}


def resolve_ssd_impl(impl: str, backend: Optional[str] = None) -> str:
    """Map ``impl`` ("auto" or a concrete name) to the implementation `ssd` runs on `backend` (default:
    the tracing backend, `jax.default_backend()`)."""
    if impl == "auto":
        return _SSD_AUTO_BY_BACKEND.get(backend or jax.default_backend(), "chunked")
    if impl not in SSD_IMPLS + ("pallas",):
        raise ValueError(f"ssd: `impl` must be one of {SSD_IMPLS + ('auto', 'pallas')}; got {impl!r}")
    return impl


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx, impl) -> None:
    fn = "ssd"
    check_array(fn, "x", x, ("b", "l", "h", "p"))
    b, l, h, p = x.shape
    check_array(fn, "dt", dt, (b, l, h))
    check_array(fn, "A", A, (h,))
    check_array(fn, "B", B, (b, l, "g", "n"))
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"ssd: `B` has {g} groups, which must divide the number of heads h={h}")
    check_array(fn, "C", C, (b, l, g, n))
    if D is not None:
        check_array(fn, "D", D, (h,) if D.ndim == 1 else (h, p))
    if z is not None:
        check_array(fn, "z", z, (b, l, h, p))
    if dt_bias is not None:
        check_array(fn, "dt_bias", dt_bias, (h,))
    if initial_state is not None:
        check_array(fn, "initial_state", initial_state, (b, h, p, n))
    if seq_idx is not None:
        check_array(fn, "seq_idx", seq_idx, (b, l), kind="int")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: `chunk_size` must be a positive int; got {chunk_size!r}")
    if impl not in SSD_IMPLS + ("auto", "pallas"):
        raise ValueError(f"ssd: `impl` must be one of {SSD_IMPLS + ('auto', 'pallas')}; got {impl!r}")


def ssd(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
        initial_state=None, seq_idx=None, return_final_state: bool = False, impl: str = "auto"):
    """Mamba-2 SSD over a batch of sequences.

    Args:
      x: (b, l, h, p) input, h heads of p channels.
      dt: (b, l, h) time steps (before `dt_bias` and softplus).
      A: (h,) decay per head (negative).
      B, C: (b, l, g, n) with g groups dividing h (head i uses group i // (h/g)).
      chunk_size: chunk length of the chunked algorithm (the official default is 256).
      D: optional (h,) or (h, p) skip.  z: optional (b, l, h, p) gate.  dt_bias: optional (h,).
      dt_softplus: apply softplus to dt (+ bias).
      initial_state: optional (b, h, p, n).
      seq_idx: optional (b, l) int: the state resets wherever the id changes (packed sequences).
      return_final_state: also return the (b, h, p, n) state after the last step.
      impl: "auto" ("pallas" on TPU/GPU, else "chunked"), "reference", "chunked" or "pallas" (`chunk_size` is then the kernel's
        chunk).
    Returns:
      y (b, l, h, p) in the dtype of `x`; with `return_final_state`, (y, final_states (b, h, p, n)),
      float32 (float64 for float64 inputs).
    """
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx, impl)
    impl = resolve_ssd_impl(impl)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    cd = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    delta = time_step(dt, dt_bias, dt_softplus, cd)

    if impl == "pallas":   # on a sharded program, run it per shard: `mamba_jax.sharding.ssd_on_mesh`
        from pallas_kernels.ssd import BlockSizes
        from pallas_kernels.ssd import ssd_scan as pallas_ssd_scan

        y, final = pallas_ssd_scan(x, delta, A, B, C, initial_state=initial_state, seq_idx=seq_idx,
                                   block_sizes=BlockSizes(chunk=chunk_size))
    elif impl == "reference":
        y, final = _ssd_reference(x.astype(cd), delta, A.astype(cd), B.astype(cd), C.astype(cd),
                                  initial_state, seq_idx)
    else:
        y, final = _ssd_chunked(x.astype(cd), delta, A.astype(cd), B.astype(cd), C.astype(cd),
                                None if initial_state is None else initial_state.astype(cd),
                                seq_idx, min(chunk_size, l))
    if D is not None:
        Dc = D.astype(cd)
        y = y + x.astype(cd) * (Dc[:, None] if D.ndim == 1 else Dc)
    if z is not None:
        y = y * jax.nn.silu(z.astype(cd))
    y = y.astype(x.dtype)
    return (y, final) if return_final_state else y


def _ssd_reference(x, delta, A, B, C, initial_state, seq_idx):
    """Heads flattened into channels (d = h·p) and the Mamba-1 reference scan."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    u = x.reshape(b, l, h * p)
    delta_c = jnp.repeat(delta, p, axis=-1)
    A_c = jnp.broadcast_to(jnp.repeat(A, p)[:, None], (h * p, n))
    h0 = None if initial_state is None else initial_state.reshape(b, h * p, n)
    y, final = selective_scan(u, delta_c, A_c, B, C, initial_state=h0, seq_idx=seq_idx,
                              return_final_state=True, impl="reference")
    return y.reshape(b, l, h, p), final.reshape(b, h, p, n)


def segsum(x):
    """Stable segment sum: out[..., i, j] = Σ_{j<k≤i} x[..., k] for i ≥ j, -inf above the diagonal.

    x: (..., T) -> (..., T, T). Sums the masked terms directly instead of differencing cumulative
    sums, so no catastrophic cancellation for long chunks.
    """
    T = x.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((T, T), bool), -1)
    terms = jnp.where(strictly_lower, x[..., :, None], 0)  # terms[..., k, j] = x_k for k > j
    sums = jnp.cumsum(terms, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), sums, -jnp.inf)


def _ssd_chunked(x, delta, A, B, C, initial_state, seq_idx, chunk):
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    pad = -l % chunk
    n_chunks = (l + pad) // chunk
    # Segment ids: +1 at every change of seq_idx, so "same segment" == "no reset in between".
    seg = jnp.zeros((b, l), jnp.int32) if seq_idx is None else segment_ids(seq_idx)
    if pad:
        # Padded steps have Δ = 0: decay exp(0) = 1 and no input, in the last segment.
        pad_time = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        x, delta, B, C = map(pad_time, (x, delta, B, C))
        seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")
    heads_per_group = h // g
    to_chunks = lambda v: v.reshape(b, n_chunks, chunk, *v.shape[2:])
    X = to_chunks(x * delta[..., None])                                  # (b, c, T, h, p)
    Bh = to_chunks(jnp.repeat(B, heads_per_group, axis=2))               # (b, c, T, h, n)
    Ch = to_chunks(jnp.repeat(C, heads_per_group, axis=2))
    log_a = jnp.moveaxis(to_chunks(delta * A), 3, 1)                     # (b, h, c, T)
    seg = to_chunks(seg)                                                 # (b, c, T)
    cum = jnp.cumsum(log_a, axis=-1)

    # 1. within each chunk: y_i = Σ_{j≤i, same segment} C_i·B_j exp(Σ_{j<k≤i} log a_k) Δ_j x_j
    same = seg[..., :, None] == seg[..., None, :]                        # (b, c, T, T)
    decay = jnp.exp(segsum(log_a)) * same[:, None]                       # (b, h, c, T, T)
    y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay, X)

    # 2. each chunk's own contribution to the state at its end
    to_end = jnp.exp(cum[..., -1:] - cum) * (seg == seg[..., -1:])[:, None]  # (b, h, c, T)
    chunk_states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", Bh, to_end, X)

    # 3. states entering each chunk: a linear recurrence over chunks
    prev_seg = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), seg[:, :-1, -1]], axis=1)  # (b, c)
    survives = (seg[..., -1] == prev_seg).astype(x.dtype)                 # no reset inside the chunk
    chunk_decay = jnp.exp(cum[..., -1]) * survives[:, None]               # (b, h, c)
    h0 = jnp.zeros((b, h, p, n), x.dtype) if initial_state is None else initial_state

    def pass_state(state, inputs):
        decay_c, new_c = inputs
        return decay_c[..., None, None] * state + new_c, state

    final, entering = jax.lax.scan(pass_state, h0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)                               # (b, c, h, p, n)

    # 4. the entering state's contribution inside each chunk (until the first reset)
    from_start = jnp.exp(cum) * (seg == prev_seg[..., None])[:, None]     # (b, h, c, T)
    y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering, from_start)

    y = (y_diag + y_off).reshape(b, n_chunks * chunk, h, p)[:, :l]
    return y, final
