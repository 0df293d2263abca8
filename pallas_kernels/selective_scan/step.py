"""The per-step math of the selective-scan kernels, shared by the TPU (Mosaic) variant in `kernel.py` and
the GPU (Triton) variant in `triton_kernel.py`: the static config, the in-kernel helpers, one time step
forward and backward, and the backward kernel's inputs and outputs."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


_SQUEEZED = getattr(pl, "squeezed", None)  # `None` in a block shape squeezes too (older spelling)


def zero_pad_axis(x, axis: int, length: int):
    """`x` zero-padded at the end of `axis` to `length` (returned as it is when already that long)."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static facts every kernel body needs."""

    seq_len: int  # true length (before padding)
    n_lblocks: int
    block_l: int
    block_d: int
    n: int
    dtype: jnp.dtype  # state / compute dtype
    softplus: bool
    has_z: bool
    has_keep: bool
    variant: str = "tpu"  # "tpu": grid over sequence blocks, VMEM state; "triton": one program walks them

    @property
    def padded(self) -> bool:
        return self.n_lblocks * self.block_l != self.seq_len


# --- small in-kernel helpers (each lowers to broadcasts, selects and reductions on TPU) ----------


def _eye(n):
    rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return rows == cols


def _to_col(row, eye):
    """(1, n) -> (n, 1) without a transpose op: select the diagonal of the row broadcast, sum lanes."""
    return jnp.sum(jnp.where(eye, row, jnp.zeros((), row.dtype)), axis=1, keepdims=True)


def _to_row(col, eye):
    """(n, 1) -> (1, n): select the diagonal of the column broadcast, sum sublanes."""
    return jnp.sum(jnp.where(eye, col, jnp.zeros((), col.dtype)), axis=0, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x):
    # the same formula as jax.nn.softplus (logaddexp(x, 0))
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _row(ref, t):
    """Row t of a (block_l, width) block ref, as (1, width)."""
    return ref[pl.ds(t, 1), :]


class _Refs(dict):
    """The kernel's refs by name, with row-accessed blocks of a dtype other than the compute dtype
    staged through compute-dtype VMEM scratch: Mosaic cannot prove that a dynamic single-row access
    into a packed (bf16: 16-row tiles) block is tile-aligned, so such inputs are copied (and cast)
    whole into scratch at the start of a program, and such outputs are written row by row to scratch
    and cast whole into the output block at the end."""

    def __init__(self, refs, in_names, out_names, staged_in, staged_out):
        # order of pallas_call refs: inputs, outputs, the kernel's own scratch, then the staging scratch
        io = tuple(in_names) + tuple(out_names)
        staged = tuple("stage_" + x for x in staged_in + staged_out)
        n_own = len(refs) - len(io) - len(staged)
        super().__init__(zip(io + staged, refs[:len(io)] + refs[len(io) + n_own:]))
        self.scratch = list(refs[len(io):len(io) + n_own])
        self.staged_out = staged_out
        for name in staged_in:
            self["stage_" + name][...] = self[name][...].astype(self["stage_" + name].dtype)

    def rows(self, name):
        """The ref to read/write rows of `name` through."""
        return self.get("stage_" + name, self[name])

    def flush(self):
        for name in self.staged_out:
            self[name][...] = self["stage_" + name][...].astype(self[name].dtype)


class _Step:
    """The inputs of one time step t of sequence block `lblock`, in the compute dtype."""

    def __init__(self, cfg, t, lblock, r, bias, A, eye):
        cd = cfg.dtype
        self.u = _row(r.rows("u"), t).astype(cd)  # (1, bd)
        self.raw = _row(r.rows("delta"), t).astype(cd) + bias  # (1, bd)
        dt = _softplus(self.raw) if cfg.softplus else self.raw
        if cfg.padded:  # padded steps: Δ = 0, the state passes through unchanged
            self.valid = (lblock * cfg.block_l + t < cfg.seq_len).astype(cd)
            dt = dt * self.valid
        self.dt = dt
        self.B = _to_col(_row(r.rows("B"), t).astype(cd), eye)  # (n, 1)
        self.C = _to_col(_row(r.rows("C"), t).astype(cd), eye)  # (n, 1)
        a = jnp.exp(dt * A)  # (n, bd)
        if cfg.has_keep:
            a = a * _row(r.rows("keep"), t).astype(cd)  # (1, 1): 0 where a packed sequence starts
        self.a = a
        self.dtu = dt * self.u  # (1, bd)

    def advance(self, h):
        """The state after this step from the state h (n, bd) before it."""
        return self.a * h + self.B * self.dtu


class _Consts:
    """The per-program constants: Aᵀ (n, bd), D and delta_bias (1, bd), the (n, n) identity mask."""

    def __init__(self, cfg, r):
        cd = cfg.dtype
        self.A = r["At"][...].astype(cd)
        self.D = r["D"][...].astype(cd)
        self.bias = r["bias"][...].astype(cd)
        self.eye = _eye(cfg.n)

    def step(self, cfg, r, t, lblock):
        return _Step(cfg, t, lblock, r, self.bias, self.A, self.eye)


# --- one time step, forward and backward (shared by the TPU and the Triton variant) --------------
# t indexes rows of the row-accessed refs (`r.rows(name)`); `lblock * cfg.block_l + t` is the step's
# position in the sequence (only used to find padded steps).


def _fwd_step(cfg, r, c: _Consts, t, lblock, h):
    """Step t: writes y row t and returns the new state."""
    s = c.step(cfg, r, t, lblock)
    h = s.advance(h)
    y = jnp.sum(s.C * h, axis=0, keepdims=True) + c.D * s.u  # (1, bd)
    if cfg.has_z:
        z = _row(r.rows("z"), t).astype(cfg.dtype)
        y = y * (z * _sigmoid(z))
    y_rows = r.rows("y")
    y_rows[pl.ds(t, 1), :] = y.astype(y_rows.dtype)
    return h


def _bwd_step(cfg, r, c: _Consts, t, lblock, h_prev, carry):
    """The reverse of step t given the state h_prev before it: writes rows t of du, ddelta, dz, dB, dC and
    returns the carry (g_next, dA, dD, dbias); g_next is the cotangent reaching the state before step t
    (a_t g_t), dA (n, bd), dD and dbias (1, bd) are running sums."""
    g_next, dA, dD, dbias = carry
    cd = cfg.dtype
    A, D, eye = c.A, c.D, c.eye
    s = c.step(cfg, r, t, lblock)
    h = s.advance(h_prev)
    dy = _row(r.rows("dy"), t).astype(cd)  # (1, bd), cotangent of the gated output
    if cfg.has_z:
        dz_rows = r.rows("dz")
        z = _row(r.rows("z"), t).astype(cd)
        sig = _sigmoid(z)
        y_pre = jnp.sum(s.C * h, axis=0, keepdims=True) + D * s.u
        dz_rows[pl.ds(t, 1), :] = (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).astype(dz_rows.dtype)
        dy = dy * (z * sig)
    du_rows, ddl_rows, dB_rows, dC_rows = (r.rows(x) for x in ("du", "ddelta", "dB", "dC"))
    dD = dD + dy * s.u
    g = g_next + s.C * dy  # (n, bd): cotangent of h_t
    dC_rows[pl.ds(t, 1), :] = _to_row(jnp.sum(h * dy, axis=1, keepdims=True), eye).astype(dC_rows.dtype)
    d_log_a = g * h_prev * s.a  # cotangent of Δ_t A
    d_dtu = jnp.sum(g * s.B, axis=0, keepdims=True)  # (1, bd)
    dB_rows[pl.ds(t, 1), :] = _to_row(jnp.sum(g * s.dtu, axis=1, keepdims=True), eye).astype(dB_rows.dtype)
    ddt = jnp.sum(d_log_a * A, axis=0, keepdims=True) + d_dtu * s.u  # cotangent of Δ_t
    dA = dA + d_log_a * s.dt
    du_rows[pl.ds(t, 1), :] = (d_dtu * s.dt + dy * D).astype(du_rows.dtype)
    if cfg.padded:
        ddt = ddt * s.valid
    if cfg.softplus:
        ddt = ddt * _sigmoid(s.raw)
    ddl_rows[pl.ds(t, 1), :] = ddt.astype(ddl_rows.dtype)
    dbias = dbias + ddt
    return s.a * g, dA, dD, dbias


def _bwd_init(cfg, g):
    """The initial backward carry from the cotangent g (n, bd) of the last state: zero sums."""
    zeros_row = jnp.zeros((1, cfg.block_d), cfg.dtype)
    return g, jnp.zeros_like(g), zeros_row, zeros_row


def _backward_io(cfg: _Config, u, delta, At, Bt, Ct, D, bias, z, keep, h_starts, dy, dh_last):
    """The backward kernel's named inputs and output shapes (both variants): du, ddelta, dz (b, L, d);
    per-channel-block dB, dC (b, d/block_d, L, n); per-batch-row dAt (b, n, d), dD, dbias (b, 1, d); dh0."""
    b, L, d = u.shape
    n, cd, nd = cfg.n, cfg.dtype, d // cfg.block_d
    inputs = dict(u=u, delta=delta, At=At, B=Bt, C=Ct, D=D, bias=bias, z=z, keep=keep, h_starts=h_starts,
                  dy=dy, dh_last=dh_last)
    outputs = dict(du=jax.ShapeDtypeStruct((b, L, d), u.dtype), ddelta=jax.ShapeDtypeStruct((b, L, d), delta.dtype))
    if cfg.has_z:
        outputs["dz"] = jax.ShapeDtypeStruct((b, L, d), z.dtype)
    outputs.update(
        dB=jax.ShapeDtypeStruct((b, nd, L, n), cd), dC=jax.ShapeDtypeStruct((b, nd, L, n), cd),
        dAt=jax.ShapeDtypeStruct((b, n, d), cd), dD=jax.ShapeDtypeStruct((b, 1, d), cd),
        dbias=jax.ShapeDtypeStruct((b, 1, d), cd), dh0=jax.ShapeDtypeStruct((b, n, d), cd),
    )
    return inputs, outputs
