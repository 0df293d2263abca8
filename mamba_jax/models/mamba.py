"""MambaLM: embeddings → n_layer × (RMSNorm → MambaMixer, float32 residual) → RMSNorm → tied head."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.layers import LayerCache, MambaConfig, MambaMixer, RMSNorm, init_layer_cache
from mamba_jax.ops._checks import check_array
from mamba_jax.sharding import EMBED, VOCAB

MambaCache = Tuple[LayerCache, ...]


class LMOutput(NamedTuple):
    """logits: (b, l, vocab_size) float32; cache: the new MambaCache (when one was passed);
    hidden_states: n_layer + 1 residual-stream tensors (b, l, d_model) — the embeddings, then the
    output of each layer (before the final norm) — when `return_hidden_states`."""

    logits: jax.Array
    cache: Optional[MambaCache]
    hidden_states: Optional[Tuple[jax.Array, ...]]


class MambaBlock(nn.Module):
    """Pre-norm residual block. h: (b, l, d_model) residual stream (float32 when residual_in_fp32)."""

    config: MambaConfig

    @nn.compact
    def __call__(self, h, *, seq_idx=None, mask=None, cache=None):
        cfg = self.config
        normed = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="norm")(h)
        out, new_cache = MambaMixer(cfg, name="mixer")(
            normed.astype(cfg.jnp_dtype), seq_idx=seq_idx, mask=mask, cache=cache)
        return h + out.astype(h.dtype), new_cache


class MambaLM(nn.Module):
    """Mamba-1 language model.

    `model.apply({"params": params}, input_ids)` → logits (b, l, vocab_size), float32.
    Keyword options: `seq_idx` (b, l) int for packed sequences, `mask` (b, l) for left padding,
    `cache` (a MambaCache from `init_cache`) to continue from a recurrent state, and
    `return_hidden_states`. With a cache or hidden states requested the result is an `LMOutput`.
    """

    config: MambaConfig

    @nn.compact
    def __call__(self, input_ids, *, seq_idx=None, mask=None, cache: Optional[MambaCache] = None,
                 return_hidden_states: bool = False):
        cfg = self.config
        check_array("MambaLM", "input_ids", input_ids, ("b", "l"), kind="int")
        b, l = input_ids.shape
        if mask is not None:
            check_array("MambaLM", "mask", mask, (b, l), kind="any")
        if cache is not None and len(cache) != cfg.n_layer:
            raise ValueError(f"MambaLM: `cache` must hold {cfg.n_layer} LayerCache entries; got {len(cache)}")

        embed = nn.Embed(
            cfg.padded_vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), (VOCAB, EMBED)),
            name="embeddings")
        h = embed(input_ids)
        h = h.astype(jnp.promote_types(jnp.float32, h.dtype) if cfg.residual_in_fp32 else h.dtype)
        hidden_states = [h]
        new_cache = []
        for i in range(cfg.n_layer):
            h, layer_cache = MambaBlock(cfg, name=f"layers_{i}")(
                h, seq_idx=seq_idx, mask=mask, cache=None if cache is None else cache[i])
            hidden_states.append(h)
            new_cache.append(layer_cache)
        h = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="norm_f")(h).astype(cfg.jnp_dtype)
        if cfg.tie_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                              param_dtype=cfg.jnp_param_dtype, name="lm_head",
                              kernel_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(cfg.initializer_range), (EMBED, VOCAB)))(h)
        logits = logits[..., :cfg.vocab_size].astype(jnp.promote_types(jnp.float32, logits.dtype))
        if cache is None and not return_hidden_states:
            return logits
        return LMOutput(logits, None if cache is None else tuple(new_cache),
                        tuple(hidden_states) if return_hidden_states else None)


def init_cache(config: MambaConfig, batch_size: int) -> MambaCache:
    """A zero recurrent cache: one LayerCache per layer."""
    return tuple(init_layer_cache(config, batch_size) for _ in range(config.n_layer))


def init_params(model: MambaLM, rng, seq_len: int = 8):
    """Initialise and unbox the parameters (the logical axis names are read with `param_axes`)."""
    boxed = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return nn.meta.unbox(boxed)


def param_axes(model: MambaLM):
    """The logical axis names of every parameter, as a pytree of PartitionSpec-like tuples."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return nn.get_partition_spec(boxed)
