"""The invariants as functions that raise AssertionError, so each test can also show that the same
assertion catches a planted bug (the `test_*_can_fail` companions).

Every check runs its model in one jitted program (compile time is the suite's cost).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.inference import prefill, step
from mamba_jax.models.lm import init_cache
from tests.invariants.families import HALF, VOCAB, tokens

# float32 with O(length · layers) accumulated roundings: ~1e-5 relative; the tolerance is 20x that, and
# far below the O(0.1 – 1) changes a state, mask or routing bug makes (see test_state_matters).
RTOL = 2e-4


def close(got, want, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


# ---------------------------------------------------------------------------------------- forward set

PAD_IDS = np.array([VOCAB + 2, -5, 1000, 63, 0, VOCAB] * HALF)[:HALF]   # out of range: clipped, then masked


def forward_rows(seed: int = 1):
    """Token rows (4, 2H) and the (2, H) documents they are made of:
    r0 = x;  r1 = x with every token after H changed;  r2 = H pads, then x[:H];  r3 = x[:H] packed with y[:H].
    """
    x, z, y = tokens(seed, 1, 2 * HALF)[0], tokens(seed + 1, 1, 2 * HALF)[0], tokens(seed + 2, 1, HALF)[0]
    rows = jnp.stack([x, jnp.concatenate([x[:HALF], z[HALF:]]), jnp.concatenate([jnp.asarray(PAD_IDS), x[:HALF]]),
                      jnp.concatenate([x[:HALF], y])])
    mask = jnp.ones((4, 2 * HALF), jnp.int32).at[2, :HALF].set(0)
    seq_idx = jnp.zeros((4, 2 * HALF), jnp.int32).at[3, HALF:].set(1)
    return rows, mask, seq_idx, jnp.stack([x[:HALF], y])


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("deterministic", "use_mask", "use_seq_idx"))
def forward_set(model, params, rows, mask, seq_idx, docs, *, deterministic=True, use_mask=True, use_seq_idx=True):
    """(full (4, 2H, V), alone (2, H, V)): the rows with their mask and seq_idx, and the documents alone.
    The rows go in as embeddings with NaN at the padding, so a mask that multiplies would show."""
    table = params["embeddings"]["embedding"]
    embeds = jnp.where((mask != 0)[..., None], table[jnp.clip(rows, 0, VOCAB - 1)], jnp.nan)
    full = model.apply({"params": params}, inputs_embeds=embeds, mask=mask if use_mask else None,
                       seq_idx=seq_idx if use_seq_idx else None, deterministic=deterministic,
                       mutable=["losses", "moe_metrics"])[0]
    alone = model.apply({"params": params}, inputs_embeds=table[docs], deterministic=deterministic,
                        mutable=["losses", "moe_metrics"])[0]
    return full, alone


def check_prefix_causality(full, alone, name):
    """forward(x)[:, :H] == forward(x[:, :H]); tokens after H change nothing before H."""
    close(full[0, :HALF], alone[0], f"{name}: forward(x)[:H] vs forward(x[:H])")
    close(full[1, :HALF], full[0, :HALF], f"{name}: changing tokens after H changed the logits before H")
    assert float(jnp.abs(full[1, HALF:] - full[0, HALF:]).max()) > 1e-3, f"{name}: the change did not show"


def check_padded(full, alone, name):
    """A left-padded row (NaN embeddings at its padding) gives the unpadded row's logits, finite."""
    assert np.isfinite(np.asarray(full[2, HALF:])).all(), f"{name}: NaN at padding reached a real position"
    close(full[2, HALF:], alone[0], f"{name}: left-padded row vs unpadded")


def check_packed(full, alone, name):
    """Two documents packed in one row (seq_idx) give each document's logits alone."""
    close(full[3, :HALF], alone[0], f"{name}: packed document 1 vs alone")
    close(full[3, HALF:], alone[1], f"{name}: packed document 2 vs alone")


# ----------------------------------------------------------------------------------------- decode set

CHUNKS = (5, 3)     # ragged prefill chunks, then STEPS one-token steps
STEPS = 10
N_PADS = 3          # row 1's prompt is left-padded by this much


def decode_inputs(seed: int = 1):
    """Row 0 consumes x[0:5], x[5:8], then x[8:18] one at a time; row 1 consumes [pad pad pad x0 x1],
    [x2 x3 x4], then x[5:15]. Returns (chunk1 ids, chunk1 mask, chunk2 ids, step ids (STEPS, 2), x)."""
    x = tokens(seed, 1, 2 * HALF)[0]
    c1, c2 = CHUNKS
    row1 = jnp.concatenate([jnp.asarray(PAD_IDS[:N_PADS]), x[:c1 - N_PADS]])
    chunk1 = jnp.stack([x[:c1], row1])
    mask1 = jnp.ones((2, c1), jnp.int32).at[1, :N_PADS].set(0)
    o = c1 - N_PADS
    chunk2 = jnp.stack([x[c1:c1 + c2], x[o:o + c2]])
    steps = jnp.stack([x[c1 + c2:c1 + c2 + STEPS], x[o + c2:o + c2 + STEPS]], axis=1)
    return chunk1, mask1, chunk2, steps, x


def decode_positions():
    """The positions of x whose logits rows 0 and 1 produce, in order (prefill chunks, then steps)."""
    n = sum(CHUNKS) + STEPS
    return np.arange(n), np.arange(n) - N_PADS


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def decode_set(model, params, chunk1, mask1, chunk2, steps, corrupt_after_chunk1=None, corrupt_after_prefill=None):
    """Logits (2, n, V) of a ragged chunked prefill followed by one-token steps (a `lax.scan` of `step`).
    `corrupt_*`: optional cache -> cache functions that plant a bug (for the companions)."""
    cache = init_cache(model.config, 2, sum(CHUNKS) + STEPS)
    l1, cache = prefill(model, params, chunk1, cache, mask1)
    if corrupt_after_chunk1 is not None:
        cache = corrupt_after_chunk1(cache)
    l2, cache = prefill(model, params, chunk2, cache)
    if corrupt_after_prefill is not None:
        cache = corrupt_after_prefill(cache)

    def body(cache, ids):
        logits, cache = step(model, params, ids, cache)
        return cache, logits

    _, ls = jax.lax.scan(body, cache, steps)
    return jnp.concatenate([l1, l2, jnp.swapaxes(ls, 0, 1)], axis=1)


def check_decode(decoded, reference, name):
    """Chunked prefill + step-by-step decoding == the full forward, unpadded and left-padded."""
    pos0, pos1 = decode_positions()
    close(decoded[0], reference[pos0], f"{name}: chunked prefill + steps vs forward")
    real = pos1 >= 0
    close(decoded[1][real], reference[pos1[real]], f"{name}: left-padded prompt, chunked prefill + steps vs forward")
