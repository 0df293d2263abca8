"""Position ids of tokens in rows that may hold left padding and packed sequences (pure jnp)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops.attention import segment_ids

__all__ = ["token_positions"]


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
    new_segment = jnp.concatenate([jnp.ones((batch, 1), bool), segment[:, 1:] != segment[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(new_segment, idx, 0), axis=1)
    return pos - jnp.take_along_axis(pos, segment_start, axis=1) + jnp.where(segment == 0, start[:, None], 0)
