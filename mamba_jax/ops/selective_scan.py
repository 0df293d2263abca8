"""Mamba-1 selective scan: one dispatcher over interchangeable implementations.

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t        (state h: (b, d, n))
    y_t = C_t · h_t + D u_t ;   y ← y ⊙ silu(z)

Implementations (all give the same values and gradients as `reference`):

- ``reference``   — `lax.scan` over time; the truth every other implementation is tested against.
- ``associative`` — `jax.lax.associative_scan` over (exp(ΔA), ΔBu) pairs; O(log l) depth, but it
  materialises (b, l, d, n) in forward and backward.
- ``chunked``     — the sequential scan with a custom VJP: forward keeps only the state at each chunk
  start, backward recomputes one chunk at a time and runs a hand-written reverse recurrence. Backward
  memory O(b·chunk·d·n + (l/chunk)·b·d·n) instead of O(b·l·d·n). Reverse-mode differentiation only
  (like the official CUDA kernels); use `reference` for forward-mode (jvp).
- ``chunked_associative`` — the same chunking with `associative_scan` inside each chunk (parallel depth
  for accelerators).
- ``pallas``      — the Pallas kernels of `pallas_kernels.selective_scan` (imported lazily): discretisation,
  D, z gating, dt_bias/softplus, initial/final state and seq_idx inside the kernel, float32 state in
  on-chip memory, a backward kernel that recomputes states per sequence block from the block-start states
  the forward saved. TPU (Mosaic) layout; on CPU it runs in Pallas interpret mode (how the kernels are
  gradient-checked without an accelerator). The TPU (Mosaic) or GPU (Triton) variant is picked when
  lowering. Not in `IMPLS` (the list the fast tests sweep); ``auto`` picks it on TPU only (on GPU once a GPU
  run has verified the Triton variant; until then ``auto`` there is ``chunked_associative``).

The state and the discretisation are computed in float32 for float32/bf16/fp16 inputs (float64 stays
float64); only the output is cast back to the dtype of `u`.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import check_array, compute_dtype
from mamba_jax.ops.positions import segment_starts

IMPLS = ("reference", "associative", "chunked", "chunked_associative")
DEFAULT_CHUNK_SIZE = 256

# impl="auto" per backend. CPU: `chunked`, from `mamba-jax bench scan` (README, "Benchmarks"): its forward
# runs at the speed of `reference` (the same sequential scan) and its hand-written backward ~3x faster,
# with bounded memory. TPU: the Pallas (Mosaic) kernels, AOT-compiled for v5e in the tests. GPU: the plain-JAX
# `chunked_associative` until a GPU run has verified the Triton kernels (they are lowered from a CPU host in
# the tests but have never run on a GPU): pass impl="pallas" explicitly to use them. Other backends: the
# parallel `chunked_associative`. The backend is the one tracing (`jax.default_backend()`); `mamba-jax aot`
# resolves "auto" for its target.
_AUTO_BY_BACKEND = {"cpu": "chunked", "tpu": "pallas", "gpu": "chunked_associative"}
_AUTO_DEFAULT = "chunked_associative"


def resolve_impl(impl: str, seq_len: int, backend: Optional[str] = None) -> str:
    """Map ``impl`` ("auto" or a name in IMPLS) to a concrete implementation name.

    `seq_len` is part of the decision interface; on CPU the measured best is the same at every length.
    """
    if impl == "pallas":
        return impl
    if impl == "auto":
        return _AUTO_BY_BACKEND.get(backend or jax.default_backend(), _AUTO_DEFAULT)
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: `impl` must be one of {IMPLS + ('auto', 'pallas')}; got {impl!r}")
    return impl


def time_step(dt, bias, softplus: bool, dtype):
    """Δ in `dtype`: dt (+ bias broadcast over the last axis), then softplus if asked."""
    delta = dt.astype(dtype)
    if bias is not None:
        delta = delta + bias.astype(dtype)
    return jax.nn.softplus(delta) if softplus else delta


def _validate(u, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size) -> int:
    """Checks shapes/dtypes at trace time; returns the number of B/C groups."""
    fn = "selective_scan"
    check_array(fn, "u", u, ("b", "l", "d"))
    b, l, d = u.shape
    check_array(fn, "dt", dt, (b, l, d))
    check_array(fn, "A", A, (d, "n"))
    n = A.shape[1]
    if B.ndim == 3:
        check_array(fn, "B", B, (b, l, n))
        groups = 1
    else:
        check_array(fn, "B", B, (b, l, "g", n))
        groups = B.shape[2]
        if d % groups:
            raise ValueError(f"selective_scan: `B` has {groups} groups, which must divide d={d}")
    check_array(fn, "C", C, B.shape)
    if D is not None:
        check_array(fn, "D", D, (d,))
    if z is not None:
        check_array(fn, "z", z, (b, l, d))
    if dt_bias is not None:
        check_array(fn, "dt_bias", dt_bias, (d,))
    if initial_state is not None:
        check_array(fn, "initial_state", initial_state, (b, d, n))
    if seq_idx is not None:
        check_array(fn, "seq_idx", seq_idx, (b, l), kind="int")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"selective_scan: `chunk_size` must be a positive int; got {chunk_size!r}")
    return groups


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
    impl: str = "auto",
    chunk_size: Optional[int] = None,
):
    """Selective scan (Mamba-1 SSM) over a batch of sequences.

    Args:
      u: (b, l, d) input.
      dt: (b, l, d) time steps Δ (before `dt_bias` and softplus).
      A: (d, n) state matrix (negative for a stable system).
      B, C: (b, l, n), or grouped (b, l, g, n) with g dividing d (channel c uses group c // (d/g)).
      D: optional (d,) skip connection.
      z: optional (b, l, d) gate: y ← y ⊙ silu(z).
      dt_bias: optional (d,) added to Δ before softplus.
      dt_softplus: apply softplus to Δ (+ bias).
      initial_state: optional (b, d, n) state before the first step.
      seq_idx: optional (b, l) integer ids of packed sequences; the state resets to zero wherever the
        id changes from one position to the next (the first segment starts from `initial_state`).
      return_final_state: also return the (b, d, n) state after the last step.
      impl: "auto", "reference", "associative", "chunked", "chunked_associative" or "pallas".
      chunk_size: chunk length for the chunked impls (default 256); for "pallas", the sequence block
        `block_l` (default 128).

    Returns:
      y: (b, l, d) in the dtype of `u`; with `return_final_state`, (y, last_state) where last_state is
      (b, d, n) in float32 (float64 for float64 inputs).
    """
    groups = _validate(u, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size)
    b, l, d = u.shape
    n = A.shape[1]
    impl = resolve_impl(impl, l)
    if impl == "pallas":   # on a sharded program, run it per shard: `mamba_jax.sharding.selective_scan_on_mesh`
        from pallas_kernels.selective_scan import BlockSizes
        from pallas_kernels.selective_scan import selective_scan as pallas_selective_scan

        return pallas_selective_scan(u, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     initial_state=initial_state, seq_idx=seq_idx, return_final_state=return_final_state,
                                     block_sizes=None if chunk_size is None else BlockSizes(block_l=chunk_size))
    cd = compute_dtype(u, dt, A, B, C, D, z, dt_bias, initial_state)

    delta = time_step(dt, dt_bias, dt_softplus, cd)
    if B.ndim == 3:
        B, C = B[:, :, None, :], C[:, :, None, :]
    dg = d // groups
    # Grouped layout inside: channels (d,) -> (g, dg) so B/C broadcast over their group.
    uf = u.astype(cd).reshape(b, l, groups, dg)
    delta = delta.reshape(b, l, groups, dg)
    Af = A.astype(cd).reshape(groups, dg, n)
    Bf, Cf = B.astype(cd), C.astype(cd)
    h0 = jnp.zeros((b, groups, dg, n), cd) if initial_state is None else (
        initial_state.astype(cd).reshape(b, groups, dg, n))
    keep = None
    if seq_idx is not None:   # 0 where a packed sequence starts (the first one continues initial_state)
        keep = jnp.logical_not(segment_starts(seq_idx).at[:, 0].set(False)).astype(cd)

    if impl == "reference":
        y, h_last = _scan_reference(uf, delta, Af, Bf, Cf, h0, keep)
    elif impl == "associative":
        y, h_last = _scan_associative(uf, delta, Af, Bf, Cf, h0, keep)
    elif impl == "chunked":
        y, h_last = _scan_chunked(uf, delta, Af, Bf, Cf, h0, keep, chunk_size or DEFAULT_CHUNK_SIZE)
    else:
        y, h_last = _scan_chunked_associative(uf, delta, Af, Bf, Cf, h0, keep, chunk_size or DEFAULT_CHUNK_SIZE)

    y = y.reshape(b, l, d)
    if D is not None:
        y = y + u.astype(cd) * D.astype(cd)
    if z is not None:
        y = y * jax.nn.silu(z.astype(cd))
    y = y.astype(u.dtype)
    if return_final_state:
        return y, h_last.reshape(b, d, n)
    return y


# --- implementations, all on the grouped layout ------------------------------------------------
# u, delta: (b, l, g, p)   A: (g, p, n)   B, C: (b, l, g, n)   h0: (b, g, p, n)   keep: (b, l) or None
# return y: (b, l, g, p) and the last state (b, g, p, n), in the compute dtype.


def _forward_steps(A, h0, xs, emit_states=False):
    """Sequential recurrence on time-major inputs xs = (u, delta (t,b,g,p), B, C (t,b,g,n), keep (t,b) | None).

    Returns (h_last, y (t,b,g,p)), or with `emit_states` (h_last, (y, h_prev (t,b,g,p,n))) where h_prev[t]
    is the state before step t (what the backward pass needs).
    """
    def step(h, x):
        u_t, dt_t, B_t, C_t, keep_t = x
        a = jnp.exp(dt_t[..., None] * A)
        if keep_t is not None:
            a = a * keep_t[:, None, None, None]
        h_next = a * h + (dt_t * u_t)[..., None] * B_t[:, :, None, :]
        y = jnp.einsum("bgpn,bgn->bgp", h_next, C_t)
        return h_next, ((y, h) if emit_states else y)

    return jax.lax.scan(step, h0, xs)


def _backward_steps(A, xs, h_prev, dy, dh_last):
    """Hand-written reverse pass of `_forward_steps` over one stretch of time (time-major).

    With a_t = exp(Δ_t A)·keep_t, h_t = a_t h_{t-1} + Δ_t u_t B_t and y_t = C_t·h_t, the cotangent of
    h_t is g_t = C_t dy_t + a_{t+1} g_{t+1}; everything else follows per step from g_t and h_{t-1}.
    Returns (dh_before_first_step, dA, (du, ddt, dB, dC)).
    """
    def step(carry, x):
        g_next, dA = carry
        (u_t, dt_t, B_t, C_t, keep_t), h_prev_t, dy_t = x
        a = jnp.exp(dt_t[..., None] * A) * keep_t[:, None, None, None]
        dtu = dt_t * u_t
        h_t = a * h_prev_t + dtu[..., None] * B_t[:, :, None, :]
        g = g_next + dy_t[..., None] * C_t[:, :, None, :]
        dC = jnp.einsum("bgpn,bgp->bgn", h_t, dy_t)
        d_log_a = g * h_prev_t * a  # cotangent of Δ_t A
        d_dtu = jnp.einsum("bgpn,bgn->bgp", g, B_t)
        dB = jnp.einsum("bgpn,bgp->bgn", g, dtu)
        ddt = jnp.einsum("bgpn,gpn->bgp", d_log_a, A) + d_dtu * u_t
        dA = dA + jnp.einsum("bgpn,bgp->gpn", d_log_a, dt_t)
        return (a * g, dA), (d_dtu * dt_t, ddt, dB, dC)

    (dh_first, dA), grads = jax.lax.scan(step, (dh_last, jnp.zeros_like(A)), (xs, h_prev, dy), reverse=True)
    return dh_first, dA, grads


def _time_major(x):
    return None if x is None else jnp.moveaxis(x, 1, 0)


def _scan_reference(u, delta, A, B, C, h0, keep):
    xs = tuple(_time_major(x) for x in (u, delta, B, C, keep))
    h_last, ys = _forward_steps(A, h0, xs)
    return jnp.moveaxis(ys, 0, 1), h_last


def _split_chunks(x, chunk, pad_value=0):
    """Time-major (l, ...) -> (n_chunks, chunk, ...), padding the end of time with `pad_value`."""
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=pad_value)
    return x.reshape(-1, chunk, *x.shape[1:])


def _pad_to_chunks(xs, chunk):
    """Chunk time-major xs = (u, delta, B, C, keep). Padded steps have Δ = 0 (exp(0·A) = 1 and ΔBu = 0: the
    state passes through unchanged) and keep = 1 (no padded step starts a new packed sequence)."""
    return tuple(_split_chunks(x, chunk) for x in xs[:4]) + (_split_chunks(xs[4], chunk, 1),)


def _unchunk(x, l):
    return x.reshape(-1, *x.shape[2:])[:l]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunked_core(u, delta, A, B, C, h0, keep, chunk):
    """Time-major sequential scan whose backward recomputes the states chunk by chunk.

    Without differentiation this is the plain sequential scan. Forward-for-backward keeps only the
    state at each chunk start; the backward recomputes one chunk's states at a time and runs the
    hand-written reverse recurrence, so memory is O(chunk·b·d·n + (l/chunk)·b·d·n).
    """
    h_last, y = _forward_steps(A, h0, (u, delta, B, C, keep))
    return y, h_last


def _chunked_core_fwd(u, delta, A, B, C, h0, keep, chunk):
    chunks = _pad_to_chunks((u, delta, B, C, keep), chunk)

    def chunk_step(h, xs):
        h_next, y = _forward_steps(A, h, xs)
        return h_next, (y, h)

    h_last, (ys, h_starts) = jax.lax.scan(chunk_step, h0, chunks)
    return (_unchunk(ys, u.shape[0]), h_last), (u, delta, A, B, C, keep, h_starts)


def _chunked_core_bwd(chunk, residuals, cotangents):
    u, delta, A, B, C, keep, h_starts = residuals
    dy, dh_last = cotangents
    l = u.shape[0]
    chunks = _pad_to_chunks((u, delta, B, C, keep), chunk)
    dy_chunks = _split_chunks(dy, chunk)

    def chunk_step(carry, x):
        dh, dA = carry
        xs, h_start, dy_c = x
        _, (_, h_prev) = _forward_steps(A, h_start, xs, emit_states=True)
        dh, dA_c, grads = _backward_steps(A, xs, h_prev, dy_c, dh)
        return (dh, dA + dA_c), grads

    (dh0, dA), grads = jax.lax.scan(chunk_step, (dh_last, jnp.zeros_like(A)), (chunks, h_starts, dy_chunks),
                                    reverse=True)
    du, ddt, dB, dC = (_unchunk(g, l) for g in grads)
    return du, ddt, dA, dB, dC, dh0, jnp.zeros_like(keep)


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _scan_chunked(u, delta, A, B, C, h0, keep, chunk_size):
    b, l = u.shape[:2]
    keep = jnp.ones((b, l), u.dtype) if keep is None else keep
    xs = tuple(_time_major(x) for x in (u, delta, B, C, keep))
    ys, h_last = _chunked_core(*xs[:2], A, *xs[2:4], h0, xs[4], min(chunk_size, l))
    return jnp.moveaxis(ys, 0, 1), h_last


def _discretize(u, delta, A, B, keep):
    """(exp(ΔA), ΔBu), each (b, l, g, p, n); exp(ΔA) is zeroed where a packed sequence starts."""
    dA = jnp.exp(delta[..., None] * A)
    if keep is not None:
        dA = dA * keep[:, :, None, None, None]
    dBu = (delta * u)[..., None] * B[:, :, :, None, :]
    return dA, dBu


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _scan_associative(u, delta, A, B, C, h0, keep):
    dA, dBu = _discretize(u, delta, A, B, keep)
    dBu = dBu.at[:, 0].add(dA[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (dA, dBu), axis=1)
    y = jnp.einsum("blgpn,blgn->blgp", h, C)
    return y, h[:, -1]


def _scan_chunked_associative(u, delta, A, B, C, h0, keep, chunk_size):
    """Chunks of `associative_scan`, sequential over chunks, each chunk rematerialised in backward."""
    b, l = u.shape[:2]
    chunk = min(chunk_size, l)
    n_chunks = -(-l // chunk)
    pad = n_chunks * chunk - l
    if keep is None:
        keep = jnp.ones((b, l), u.dtype)
    if pad:
        # Padded steps have Δ = 0: exp(0·A) = 1 and ΔBu = 0, so the state passes through unchanged.
        # `keep` is padded with ones so that no padded step looks like the start of a new sequence.
        pad_time = lambda x, v=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=v)
        u, delta, B, C = map(pad_time, (u, delta, B, C))
        keep = pad_time(keep, 1)

    def to_chunks(x):  # (b, L, ...) -> (n_chunks, b, chunk, ...)
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_step(h, xs):
        y, h_next = _scan_associative(*xs[:2], A, *xs[2:4], h, xs[4])
        return h_next, y

    h_last, ys = jax.lax.scan(chunk_step, h0, tuple(map(to_chunks, (u, delta, B, C, keep))))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, n_chunks * chunk, *ys.shape[3:])
    return y[:, :l], h_last


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step of the selective scan (decoding).

    Args:
      state: (b, d, n) state before the step (float32; float64 stays float64).
      x, dt: (b, d) input and time step of this token.  A: (d, n).
      B, C: (b, n) or grouped (b, g, n).  D, dt_bias: optional (d,).  z: optional (b, d) gate.
    Returns:
      (y (b, d) in the dtype of `x`, new_state (b, d, n)).
    Equal to `selective_scan` on a length-1 sequence with `initial_state=state`.
    """
    fn = "selective_state_update"
    check_array(fn, "x", x, ("b", "d"))
    b, d = x.shape
    check_array(fn, "state", state, (b, d, "n"))
    n = state.shape[2]
    check_array(fn, "dt", dt, (b, d))
    check_array(fn, "A", A, (d, n))
    check_array(fn, "B", B, (b, n) if B.ndim == 2 else (b, "g", n))
    check_array(fn, "C", C, B.shape)
    y, new_state = selective_scan(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=state, return_final_state=True, impl="reference",
    )
    return y[:, 0], new_state


def selective_state_steps(state, x, dt, A, B, C, D=None, z=None):
    """`selective_state_update` at each position of a short chunk, keeping the state after every one
    (speculative decoding rolls a recurrent layer back to any of them).

    Args:
      state: (b, d, n) state before the chunk.  x, dt: (b, l, d) (dt already Δ).  A: (d, n).
      B, C: (b, l, n) or grouped (b, l, g, n).  D: optional (d,).  z: optional (b, l, d) gate.
    Returns:
      (y (b, l, d) in the dtype of `x`, states (b, l, d, n)): states[:, i] is the state after position i,
      so states[:, -1] is what `selective_scan(..., return_final_state=True)` returns.
    """
    fn = "selective_state_steps"
    check_array(fn, "x", x, ("b", "l", "d"))
    b, l, d = x.shape
    check_array(fn, "state", state, (b, d, "n"))
    check_array(fn, "dt", dt, (b, l, d))
    check_array(fn, "B", B, (b, l, state.shape[2]) if B.ndim == 3 else (b, l, "g", state.shape[2]))
    check_array(fn, "C", C, B.shape)
    if z is not None:
        check_array(fn, "z", z, (b, l, d))

    def body(s, inputs):
        x_t, dt_t, B_t, C_t, z_t = inputs
        y_t, s = selective_state_update(s, x_t, dt_t, A, B_t, C_t, D=D, z=z_t)
        return s, (y_t, s)

    time_major = lambda v: None if v is None else jnp.moveaxis(v, 1, 0)
    _, (y, states) = jax.lax.scan(body, state, tuple(map(time_major, (x, dt, B, C, z))))
    return jnp.moveaxis(y, 0, 1), jnp.moveaxis(states, 0, 1)
