"""Attention math (pure jnp): rotary position embeddings, grouped-query dot-product attention, masks.

Conventions (batch-first, heads before head_dim, as the Flax layers produce them):

    q: (b, lq, h, dh)      k, v: (b, lk, kv, dh) with h a multiple of kv (query head i reads kv head i // (h/kv))
    allowed: (b, lq, lk) bool — True where query i may attend to key j

Rotary embeddings follow HF Llama (`rotate_half`: the two halves of head_dim are the real and imaginary
parts, not interleaved pairs). Softmax and rotary are computed in float32 (float64 inputs stay float64).
Masks select, never multiply: masked logits get a large finite negative value, values no query may read
are replaced by zeros, and a query with no allowed key (a padding query) outputs zeros — so whatever a
masked position holds, NaN included, reaches no output.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import check_array, compute_dtype
from mamba_jax.ops.positions import segment_ids  # noqa: F401 (re-exported; a query sees its own segment's keys)

__all__ = ["attention_mask", "cached_attention", "causal_attention", "dot_product_attention", "rotary_embedding",
           "segment_ids", "shared_kv_attention"]

# A large finite negative logit for masked keys (finite in float32 and bfloat16 after the max shift).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rotary_inverse_frequencies(head_dim: int, theta: float, dtype=jnp.float32):
    """(head_dim // 2,) inverse frequencies 1 / theta^(2i / head_dim), as HF's default rope."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))


def rotary_embedding(x, positions, theta: float = 10000.0):
    """Rotate `x` by its positions (HF Llama's `apply_rotary_pos_emb` with `rotate_half`).

    x: (b, l, h, dh) with dh even; positions: (b, l) int. Returns (b, l, h, dh) in x's dtype:
    out[..., :dh/2] = x1·cos - x2·sin, out[..., dh/2:] = x2·cos + x1·sin with angle positions · inv_freq.
    """
    check_array("rotary_embedding", "x", x, ("b", "l", "h", "dh"))
    b, l, _, dh = x.shape
    check_array("rotary_embedding", "positions", positions, (b, l), kind="int")
    if dh % 2:
        raise ValueError(f"rotary_embedding: the last axis of `x` (head_dim) must be even; got {dh}")
    cd = compute_dtype(x)
    angles = positions.astype(cd)[..., None] * rotary_inverse_frequencies(dh, theta, cd)  # (b, l, dh/2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(cd), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _check_qkv(fn: str, q, k, v):
    """q (b, lq, h, dh), k (b, lk, kv, dh), v (b, lk, kv, dv) with kv dividing h; returns (b, lq, h, dh, lk, kv)."""
    check_array(fn, "q", q, ("b", "lq", "h", "dh"))
    b, lq, h, dh = q.shape
    check_array(fn, "k", k, (b, "lk", "kv", dh))
    lk, kv = k.shape[1], k.shape[2]
    check_array(fn, "v", v, (b, lk, kv, "dv"))
    if h % kv:
        raise ValueError(f"{fn}: the number of query heads ({h}, axis 2 of `q`) must be a multiple of the "
                         f"number of key/value heads ({kv}, axis 2 of `k`)")
    return b, lq, h, dh, lk, kv


def dot_product_attention(q, k, v, allowed, scale: Optional[float] = None):
    """softmax(q·kᵀ · scale, masked by `allowed`) · v with grouped-query heads.

    q: (b, lq, h, dh); k: (b, lk, kv, dh); v: (b, lk, kv, dv); allowed: (b, lq, lk) bool; h % kv == 0.
    scale defaults to 1/sqrt(dh). Logits and softmax in float32 (float64 inputs: float64).
    Returns (b, lq, h, dv) in q's dtype; zeros for a query with no allowed key.
    """
    fn = "dot_product_attention"
    b, lq, h, dh, lk, kv = _check_qkv(fn, q, k, v)
    check_array(fn, "allowed", allowed, (b, lq, lk), kind="any")
    cd = compute_dtype(q, k, v)
    scale = dh ** -0.5 if scale is None else scale
    qg = q.reshape(b, lq, kv, h // kv, dh)  # head i -> (kv head i // g, member i % g), as HF's repeat_kv
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=cd) * scale
    logits = jnp.where(allowed[:, None, None].astype(bool), logits.astype(cd), MASK_VALUE)
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    # A masked key has probability exactly 0, but 0 · NaN = NaN: values no query may read are selected away
    # (padding, unwritten cache slots), so whatever they hold never reaches an output.
    readable = jnp.any(allowed.astype(bool), axis=1)[:, :, None, None]                     # (b, lk, 1, 1)
    v = jnp.where(readable, v.astype(cd), jnp.zeros((), cd))
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=cd)
    attends = jnp.any(allowed.astype(bool), axis=2)[:, :, None, None, None]                # (b, lq, 1, 1, 1)
    out = jnp.where(attends, out, jnp.zeros((), cd))
    return out.reshape(b, lq, h, v.shape[-1]).astype(q.dtype)


def causal_attention(q, k, v, *, key_valid=None, segments=None, block_size: Optional[int] = None,
                     scale: Optional[float] = None, fused: bool = False):
    """Causal self-attention over one chunk (no cache) that skips the blocks above the diagonal.

    q: (b, l, h, dh); k: (b, l, kv, dh); v: (b, l, kv, dv); key_valid: optional (b, l) bool (False at
    padding); segments: optional (b, l) int (packed sequences: `ops.segment_ids`). Queries are taken
    `block_size` at a time (None: all at once), each block attending to the keys up to its last position
    only — about half the scores of the full l × l for long chunks, and a (block, l) score tile instead of
    (l, l). Differentiable; equal (up to rounding) to `dot_product_attention` with the causal
    `attention_mask`. Returns (b, l, h, dv) in q's dtype.

    fused=True (no padding, no packing): `jax.nn.dot_product_attention(..., is_causal=True)`, which picks
    cuDNN's flash attention on a GPU where it fits and XLA elsewhere.
    """
    fn = "causal_attention"
    b, l, h, dh, lk, kv = _check_qkv(fn, q, k, v)
    if lk != l:
        raise ValueError(f"{fn}: self-attention needs as many keys as queries; got {l} queries and {lk} keys")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{fn}: `block_size` must be None or a positive int; got {block_size!r}")
    if fused:
        if key_valid is not None or segments is not None:
            raise ValueError(f"{fn}: fused=True takes no padding (`key_valid`) and no packing (`segments`)")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
    slots = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    block = l if block_size is None else min(block_size, l)
    outs = []
    for start in range(0, l, block):
        end = min(start + block, l)          # keys past `end` are in the future of every query of the block
        keys = slice(0, end)
        allowed = attention_mask(slots[:, start:end], slots[:, keys],
                                 key_valid=None if key_valid is None else key_valid[:, keys],
                                 q_segments=None if segments is None else segments[:, start:end],
                                 k_segments=None if segments is None else segments[:, keys])
        outs.append(dot_product_attention(q[:, start:end], k[:, keys], v[:, keys], allowed, scale))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def shared_kv_attention(q, k, v, k_shared, v_shared, *, key_valid=None, segments=None,
                        scale: Optional[float] = None):
    """Causal attention of one stream over a KV cache another stream wrote (M2R2's shared KV cache), in
    parallel over a chunk: query t attends to the other stream's keys at positions < t and to its own key
    at t — what a decode step of this stream reads when the other stream has written every earlier slot.

    q: (b, l, h, dh), k, v: (b, l, kv, dh): this stream's; k_shared, v_shared: (b, l, kv, dh), the other
    stream's keys and values at the same positions; key_valid: optional (b, l) bool (False at padding);
    segments: optional (b, l) int (packed sequences). Differentiable. Returns (b, l, h, dv) in q's dtype.
    """
    fn = "shared_kv_attention"
    b, l, h, dh, lk, kv = _check_qkv(fn, q, k, v)
    if lk != l:
        raise ValueError(f"{fn}: self-attention needs as many keys as queries; got {l} queries and {lk} keys")
    check_array(fn, "k_shared", k_shared, k.shape)
    check_array(fn, "v_shared", v_shared, v.shape)
    slots = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    seg = dict(q_segments=segments, k_segments=segments) if segments is not None else {}
    # the other stream's keys sit one slot later, so `key slot <= query slot` keeps exactly the earlier ones
    earlier = attention_mask(slots, slots + 1, key_valid=key_valid, **seg)
    own = jnp.broadcast_to(jnp.eye(l, dtype=bool), (b, l, l))
    if key_valid is not None:
        own = own & key_valid.astype(bool)[:, None, :]
    return dot_product_attention(q, jnp.concatenate([k_shared, k], axis=1), jnp.concatenate([v_shared, v], axis=1),
                                 jnp.concatenate([earlier, own], axis=2), scale)


def attention_mask(q_slots, k_slots, *, key_valid=None, q_segments=None, k_segments=None):
    """The causal `allowed` mask (b, lq, lk): key slot <= query slot, key valid, same segment.

    q_slots: (b, lq) int, the sequence (cache) slot of each query; k_slots: (b, lk) int, of each key.
    key_valid: optional (b, lk) bool/int, False (0) for keys that must never be attended to (padding,
    unwritten cache slots). q_segments (b, lq) / k_segments (b, lk): optional int segment numbers (give
    both or neither); a query only sees keys of its own segment.
    """
    fn = "attention_mask"
    check_array(fn, "q_slots", q_slots, ("b", "lq"), kind="int")
    b, lq = q_slots.shape
    check_array(fn, "k_slots", k_slots, (b, "lk"), kind="int")
    lk = k_slots.shape[1]
    allowed = k_slots[:, None, :] <= q_slots[:, :, None]
    if key_valid is not None:
        check_array(fn, "key_valid", key_valid, (b, lk), kind="any")
        allowed = allowed & key_valid.astype(bool)[:, None, :]
    if (q_segments is None) != (k_segments is None):
        raise ValueError(f"{fn}: pass both `q_segments` (b, lq) and `k_segments` (b, lk), or neither")
    if q_segments is not None:
        check_array(fn, "q_segments", q_segments, (b, lq), kind="int")
        check_array(fn, "k_segments", k_segments, (b, lk), kind="int")
        allowed = allowed & (q_segments[:, :, None] == k_segments[:, None, :])
    return allowed


def cached_attention(q, k, v, q_slots, *, n_keys, key_valid, q_segments, k_segments, block_size: int = 256,
                     scale: Optional[float] = None):
    """Attention of a chunk of queries over a preallocated KV cache that reads only the filled slots.

    The keys are read block by block — `block_size` slots at a time, only the blocks below `n_keys` — with an
    online (flash-decoding) softmax in float32, so a decode step costs the filled length, not `max_len`.
    Equal (up to rounding) to ``dot_product_attention(q, k, v, attention_mask(q_slots, arange(max_len),
    key_valid=key_valid, q_segments=q_segments, k_segments=k_segments))`` when every slot a query may attend
    to lies below `n_keys`; the same masking rules (no NaN from a slot no query may read; zeros for a query
    with no allowed key).

    q: (b, lq, h, dh); k: (b, max_len, kv, dh); v: (b, max_len, kv, dv); q_slots: (b, lq) int;
    n_keys: () int (may be traced): blocks wholly at or above it are never read (the last block, shifted back
    to fit the cache, may hold such slots: they are masked); key_valid: (b, max_len) bool;
    q_segments (b, lq) / k_segments (b, max_len) int. Returns (b, lq, h, dv) in q's dtype.
    The loop has a data-dependent trip count: forward (inference) only, not reverse-differentiable.
    """
    fn = "cached_attention"
    b, lq, h, dh, max_len, kv = _check_qkv(fn, q, k, v)
    for name, x, shape, kind in (("q_slots", q_slots, (b, lq), "int"), ("key_valid", key_valid, (b, max_len), "any"),
                                 ("q_segments", q_segments, (b, lq), "int"),
                                 ("k_segments", k_segments, (b, max_len), "int")):
        check_array(fn, name, x, shape, kind=kind)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{fn}: `block_size` must be a positive int; got {block_size!r}")
    cd = compute_dtype(q, k, v)
    scale = dh ** -0.5 if scale is None else scale
    dv, g = v.shape[-1], h // kv
    block = min(block_size, max_len)
    qg = q.reshape(b, lq, kv, g, dh)
    key_valid = key_valid.astype(bool)

    def read(i, carry):
        m, total, acc = carry
        lo = i * block
        start = jnp.minimum(lo, max_len - block)      # the last block is shifted back, never clamped silently:
        slots = start + jnp.arange(block, dtype=jnp.int32)                         # slots < lo were read already
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)  # noqa: E731
        allowed = ((slots[None, None, :] <= q_slots[:, :, None]) & (slots >= lo)[None, None, :]
                   & take(key_valid)[:, None, :] & (q_segments[:, :, None] == take(k_segments)[:, None, :]))
        mask = allowed[:, None, None]                                                     # (b, 1, 1, lq, B)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, take(k), preferred_element_type=cd) * scale
        logits = jnp.where(mask, logits.astype(cd), MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), jnp.zeros((), cd))
        alpha = jnp.exp(m - m_new)
        readable = jnp.any(allowed, axis=1)[:, :, None, None]                             # (b, B, 1, 1)
        vb = jnp.where(readable, take(v).astype(cd), jnp.zeros((), cd))
        acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskd->bkgqd", p, vb, preferred_element_type=cd)
        return m_new, alpha * total + jnp.sum(p, axis=-1), acc

    init = (jnp.full((b, kv, g, lq), MASK_VALUE, cd), jnp.zeros((b, kv, g, lq), cd),
            jnp.zeros((b, kv, g, lq, dv), cd))
    n_blocks = (jnp.minimum(jnp.asarray(n_keys, jnp.int32), max_len) + block - 1) // block
    _, total, acc = jax.lax.fori_loop(0, n_blocks, read, init)
    out = jnp.where(total[..., None] > 0, acc / jnp.where(total > 0, total, 1)[..., None], jnp.zeros((), cd))
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, lq, h, dv).astype(q.dtype)
