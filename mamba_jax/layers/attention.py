"""Llama-style grouped-query attention with rotary (or learned, or no) positions and a KV cache.

Parameter names follow HF transformers' `LlamaAttention` (q_proj, k_proj, v_proj, o_proj), stored per head:
q_proj.kernel (d_model, n_heads, head_dim), k_proj/v_proj.kernel (d_model, kv_heads, head_dim), o_proj.kernel
(n_heads, head_dim, d_model) (torch's (out, in) matrices transposed and reshaped by `interop`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.layers.config import ATTENTION, BaseLMConfig, check_choice, check_positive_int
from mamba_jax.ops._checks import check_array
from mamba_jax.ops.attention import (cached_attention, causal_attention, rotary_embedding, segment_ids,
                                    shared_kv_attention)
from mamba_jax.axes import EMBED, HEADS, KV_HEADS

POSITION_EMBEDDINGS = ("rope", "learned", "none")


def llama_mlp_width(d_model: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU hidden width: int(2/3 · 4 · d_model) rounded up to a multiple of `multiple_of`."""
    return multiple_of * -(-int(2 * 4 * d_model / 3) // multiple_of)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BaseLMConfig):
    """Hyper-parameters of a Llama-style Transformer (pre-norm attention + SwiGLU MLP per layer).

    n_kv_heads (None: = n_heads) must divide n_heads (grouped-query attention); head_dim None means
    d_model // n_heads. d_intermediate None: Llama's SwiGLU width for d_model, 2/3 · 4 · d_model rounded up to
    a multiple of 256 (256 up to d_model 96, 2048 at 768, 11008 at 4096). position_embedding: "rope" (rotary, base `rope_theta`), "learned" (absolute,
    `max_position_embeddings` rows added to the token embeddings) or "none". kv_block_size: the attention
    block: KV-cache slots read per block by a cached decode step or chunked prefill (`ops.cached_attention`:
    only the filled blocks are read), and queries per block of an uncached forward (`ops.causal_attention`:
    blocks above the diagonal are skipped; on a GPU, without padding or packing,
    `jax.nn.dot_product_attention` takes its place).
    """

    family: ClassVar[str] = "transformer"

    d_intermediate: Optional[int] = None
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    position_embedding: str = "rope"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    kv_block_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("TransformerConfig", "n_heads", self.n_heads)
        check_positive_int("TransformerConfig", "kv_block_size", self.kv_block_size)
        check_positive_int("TransformerConfig", "max_position_embeddings", self.max_position_embeddings)
        if self.n_kv_heads is not None:
            check_positive_int("TransformerConfig", "n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"TransformerConfig: `n_kv_heads`={self.n_kv_heads} must divide "
                                 f"`n_heads`={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig: `d_model`={self.d_model} is not divisible by "
                             f"`n_heads`={self.n_heads}; set `head_dim` explicitly")
        if self.head_dim is not None:
            check_positive_int("TransformerConfig", "head_dim", self.head_dim)
        check_choice("TransformerConfig", "position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        if self.position_embedding == "rope" and self.head_dim_value % 2:
            raise ValueError(f"TransformerConfig: rotary embeddings need an even head_dim; got {self.head_dim_value}")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (ATTENTION,) * self.n_layer

    def default_mlp_width(self) -> int:
        return llama_mlp_width(self.d_model)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim_value(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def learned_positions(self) -> Optional[int]:
        return self.max_position_embeddings if self.position_embedding == "learned" else None


class KVCache(NamedTuple):
    """Keys and values of one attention layer, preallocated to `max_len` slots.

    key, value: (b, max_len, kv_heads, head_dim) in the model dtype (keys after the rotary embedding).
    valid: (b, max_len) bool, True where a slot holds a real token (False: unwritten, or left padding).
    segment: (b, max_len) int32, the packed-sequence segment of each slot (see `ops.segment_ids`); a
      query only attends to slots of its own segment. All zeros unless `seq_idx` was given.
    index: () int32, the next slot to write. Every row writes the same slots (left padding keeps the
      rows aligned), so a chunk of l tokens fills slots [index, index + l).

    Writing past `max_len` cannot be detected while tracing (`index` is traced): size the cache for the
    prompt (padding included) plus every generated token. A chunk that would overflow it yields NaN
    outputs instead of silently wrong ones.
    """

    key: jax.Array
    value: jax.Array
    valid: jax.Array
    segment: jax.Array
    index: jax.Array


def init_kv_cache(config: TransformerConfig, batch_size: int, max_len: Optional[int] = None) -> KVCache:
    """An empty KVCache for `batch_size` sequences of up to `max_len` tokens (required: the cache is
    preallocated; count the prompt, its padding and every token to be generated)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"init_kv_cache: `max_len` (the number of KV cache slots: prompt + padding + new "
                         f"tokens) must be a positive int for attention layers; got {max_len!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"init_kv_cache: `batch_size` must be a positive int; got {batch_size!r}")
    shape = (batch_size, max_len, config.kv_heads, config.head_dim_value)
    return KVCache(key=jnp.zeros(shape, config.jnp_dtype), value=jnp.zeros(shape, config.jnp_dtype),
                   valid=jnp.zeros((batch_size, max_len), bool),
                   segment=jnp.zeros((batch_size, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


class Attention(nn.Module):
    """Causal grouped-query self-attention (HF `LlamaAttention`). x: (b, l, d_model) -> (b, l, d_model).

    positions: (b, l) int rotary position ids (used when position_embedding == "rope").
    mask: optional (b, l), 1 real token / 0 left padding; pads are never attended to as keys, so a padded
      row gives exactly what its unpadded row gives alone (the outputs at pads are finite but meaningless).
    seq_idx: optional (b, l) int, packed sequences: a token attends only within its segment (a new
      segment starts wherever seq_idx changes; with a cache, the first segment of a chunk continues the
      last segment of the cache).
    cache: optional KVCache; the chunk's keys/values are written at slots [index, index + l), its queries
      attend to every valid slot up to their own, and the new cache (index + l) is returned. l == 1 is a
      decode step, l > 1 a (chunked) prefill. Without a cache: causal attention within the chunk.
    shared_kv_input: optional (b, l, d_model), without a cache: the normalised input of another stream's
      copy of this layer (M2R2's slow stream), whose keys and values this stream reads at earlier positions
      in place of its own (`ops.shared_kv_attention`) — the parallel form of decoding over a KV cache the
      other stream wrote.
    Returns (out, new cache or None).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, *, positions=None, seq_idx=None, mask=None, cache: Optional[KVCache] = None,
                 deterministic: bool = True, step_caches: bool = False, shared_kv_input=None):
        # no train-only behaviour (no dropout); a KV cache rolls back by its validity and index, without steps
        del deterministic, step_caches
        cfg, fn = self.config, "Attention"
        h, kv, dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim_value
        check_array(fn, "x", x, ("b", "l", cfg.d_model))
        b, l, _ = x.shape
        for name, arr, kind in (("positions", positions, "int"), ("mask", mask, "any"), ("seq_idx", seq_idx, "int")):
            if arr is not None:
                check_array(fn, name, arr, (b, l), kind=kind)
        if cfg.position_embedding == "rope" and positions is None:
            raise ValueError(f"{fn}: rotary position embeddings need `positions` (b, l) int")
        if shared_kv_input is not None:
            check_array(fn, "shared_kv_input", shared_kv_input, x.shape)
            if cache is not None:
                raise ValueError(f"{fn}: `shared_kv_input` is the uncached form of a shared KV cache; with a "
                                 "`cache`, pass the other stream's cache instead")

        # Kernels per head — (d, heads, head_dim), (head_dim last, not sharded) — so tensor parallelism splits
        # whole heads (`heads` / `kv_heads` rules, divisibility checked per head) and moves no data inside.
        def project(features, axes, name, axis=-1):
            n_in = 1 if axis == -1 else len(axis)
            return nn.DenseGeneral(
                features, axis=axis, use_bias=cfg.attention_bias, dtype=cfg.jnp_dtype,
                param_dtype=cfg.jnp_param_dtype, name=name,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[n_in:]))
        k_proj = project((kv, dh), (EMBED, KV_HEADS, None), "k_proj")
        v_proj = project((kv, dh), (EMBED, KV_HEADS, None), "v_proj")
        q = project((h, dh), (EMBED, HEADS, None), "q_proj")(x)
        k, v = k_proj(x), v_proj(x)
        rotate = (lambda t: rotary_embedding(t, positions, cfg.rope_theta)) if cfg.position_embedding == "rope" \
            else (lambda t: t)
        q, k = rotate(q), rotate(k)
        valid = jnp.ones((b, l), bool) if mask is None else mask != 0

        if shared_kv_input is not None:
            out = shared_kv_attention(q, k, v, rotate(k_proj(shared_kv_input)), v_proj(shared_kv_input),
                                      key_valid=None if mask is None else valid,
                                      segments=None if seq_idx is None else segment_ids(seq_idx))
            new_cache = None
        elif cache is None:   # causal over the chunk, in query blocks that skip the keys above the diagonal
            fused = mask is None and seq_idx is None and jax.default_backend() == "gpu"
            out = causal_attention(q, k, v, key_valid=None if mask is None else valid,
                                   segments=None if seq_idx is None else segment_ids(seq_idx),
                                   block_size=cfg.kv_block_size, fused=fused)
            new_cache = None
        else:
            out, new_cache = _attend_with_cache(q, k, v, valid, seq_idx, cache, cfg)
        out = project(cfg.d_model, (HEADS, None, EMBED), "o_proj", axis=(-2, -1))(out)
        return out, new_cache


def _check_cache(cache, cfg: TransformerConfig, b: int, l: int) -> int:
    """Validate a KVCache for a chunk of b x l tokens; returns max_len."""
    fn = "Attention"
    if not isinstance(cache, KVCache):
        raise ValueError(f"{fn}: `cache` must be a KVCache (from `init_kv_cache(config, batch_size, max_len)`); "
                         f"got {type(cache).__name__}")
    kv, dh = cfg.kv_heads, cfg.head_dim_value
    check_array(fn, "cache.key", cache.key, (b, "max_len", kv, dh))
    max_len = cache.key.shape[1]
    check_array(fn, "cache.value", cache.value, (b, max_len, kv, dh))
    check_array(fn, "cache.valid", cache.valid, (b, max_len), kind="any")
    check_array(fn, "cache.segment", cache.segment, (b, max_len), kind="int")
    check_array(fn, "cache.index", cache.index, (), kind="int")
    if l > max_len:
        raise ValueError(f"{fn}: a chunk of {l} tokens does not fit a KV cache of max_len={max_len} slots")
    return max_len


def _attend_with_cache(q, k, v, valid, seq_idx, cache: KVCache, cfg: TransformerConfig):
    """Write the chunk into the cache at slots [index, index + l) and attend over the filled slots
    [0, index + l), `cfg.kv_block_size` slots at a time (`ops.cached_attention`).

    q: (b, l, h, dh); k, v: (b, l, kv, dh); valid: (b, l) bool. Returns (out (b, l, h, dh), new KVCache).
    """
    b, l = valid.shape
    max_len = _check_cache(cache, cfg, b, l)
    index = cache.index.astype(jnp.int32)
    # The segment of the last written slot (0 for an empty cache): the chunk's first segment continues it.
    last = jax.lax.dynamic_index_in_dim(cache.segment, jnp.maximum(index - 1, 0), axis=1, keepdims=False)
    last = jnp.where(index > 0, last, 0)
    seg = jnp.broadcast_to(last[:, None], (b, l)) if seq_idx is None else segment_ids(seq_idx, last)
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index, axis=1)
    new_cache = KVCache(key=write(cache.key, k), value=write(cache.value, v), valid=write(cache.valid, valid),
                        segment=write(cache.segment, seg), index=index + l)
    q_slots = jnp.broadcast_to(index + jnp.arange(l, dtype=jnp.int32), (b, l))
    out = cached_attention(q, new_cache.key, new_cache.value, q_slots, n_keys=index + l, key_valid=new_cache.valid,
                           q_segments=seg, k_segments=new_cache.segment, block_size=cfg.kv_block_size)
    # Overflow (index + l > max_len) cannot raise inside jit: dynamic_update_slice would clamp the write
    # onto the last slots. Make it visible instead: NaN outputs.
    return jnp.where(index + l <= max_len, out, jnp.nan).astype(out.dtype), new_cache
