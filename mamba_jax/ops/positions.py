"""Packed sequences and positions (pure jnp): where a sequence starts (`segment_starts`), which sequence each
token is in (`segment_ids`), and position ids with left padding and packing (`token_positions`). Every op
that resets at a change of `seq_idx` reads it through these: the scans, attention, MoE routing, positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import check_array

__all__ = ["segment_ids", "segment_starts", "token_positions"]


def segment_starts(seq_idx):
    """(b, l) bool: True at the first token of every packed sequence — position 0 and wherever `seq_idx`
    (b, l) int changes from one position to the next (only changes matter: [0, 0, 1, 1, 0] is three)."""
    check_array("segment_starts", "seq_idx", seq_idx, ("b", "l"), kind="int")
    return jnp.concatenate([jnp.ones(seq_idx.shape[:1] + (1,), bool), seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)


def segment_ids(seq_idx, start=None):
    """Segment numbers (b, l) int32 that grow by one wherever `seq_idx` changes along a row.

    seq_idx: (b, l) int (packed sequences; only changes matter, as in the scans: [0, 0, 1, 1, 0] is three
    sequences); start: optional (b,) int, the segment of the first token (default 0) — a chunk continues
    the last segment of the chunks before it.
    """
    check_array("segment_ids", "seq_idx", seq_idx, ("b", "l"), kind="int")
    changes = segment_starts(seq_idx).at[:, 0].set(False)
    seg = jnp.cumsum(changes.astype(jnp.int32), axis=1)
    if start is not None:
        check_array("segment_ids", "start", start, seq_idx.shape[:1], kind="int")
        seg = seg + start.astype(jnp.int32)[:, None]
    return seg


def token_positions(mask, seq_idx, start, batch: int, length: int):
    """Position ids (b, l) int32 of the tokens of a chunk.

    Positions count real tokens only (left padding, `mask` == 0, does not advance them; a pad gets the
    position of the next real token), restart at 0 where `seq_idx` changes (packed sequences), and
    continue from `start` (b,) — the tokens consumed before this chunk — in the first sequence of a row.
    """
    if mask is not None:
        pos = jnp.maximum(jnp.cumsum((mask != 0).astype(jnp.int32), axis=1) - 1, 0)
    else:
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if start is None:
        start = jnp.zeros((batch,), jnp.int32)
    if seq_idx is None:
        return pos + start[:, None]
    segment = segment_ids(seq_idx)
    idx = jnp.arange(length, dtype=jnp.int32)
    segment_start = jax.lax.cummax(jnp.where(segment_starts(seq_idx), idx, 0), axis=1)
    return pos - jnp.take_along_axis(pos, segment_start, axis=1) + jnp.where(segment == 0, start[:, None], 0)
