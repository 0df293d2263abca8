"""The decoder shell every language model shares.

    embeddings (+ learned positions) → per layer: h += mixer(RMSNorm(h)); h += MLP(RMSNorm(h)) if the
    layer's config has d_intermediate > 0 → RMSNorm → head (tied to the embeddings or `lm_head`)

The mixer of layer i is `config.layer_kinds[i]`: "M" Mamba-1, "M2" Mamba-2, "A" attention, "E" MoE
feed-forward, "P" Mamba and MoE in parallel, each built from `config.mixer_config(kind)`. `MambaLM`, `Mamba2LM`, `TransformerLM` and `HybridLM` are this shell
with their family's config, so one cache pytree (`ModelCache`) and one `generate` serve them all.

Parameters: `embeddings.embedding` (Vp, d), `position_embeddings.embedding` (learned positions only),
`layers_{i}.{norm, mixer, mlp_norm, mlp}`, `norm_f.weight`, `lm_head.kernel` (untied only).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.layers.config import ATTENTION, MAMBA, MAMBA2, MAMBA_MOE, MOE, BaseLMConfig
from mamba_jax.layers.mlp import GatedMLP
from mamba_jax.layers.norm import RMSNorm
from mamba_jax.ops._checks import check_array, check_mask_values, check_token_ids, concrete_value
from mamba_jax.ops.positions import token_positions
from mamba_jax.axes import EMBED, VOCAB
from mamba_jax.sharding.kernels import constrain_batch


def mixer_module(kind: str):
    """(Flax module class, cache initialiser) of a mixer kind."""
    if kind == MAMBA:
        from mamba_jax.layers.mamba import MambaMixer, init_layer_cache
        return MambaMixer, init_layer_cache
    if kind == MAMBA2:
        from mamba_jax.layers.mamba2 import Mamba2Mixer, init_mamba2_cache
        return Mamba2Mixer, init_mamba2_cache
    if kind == ATTENTION:
        from mamba_jax.layers.attention import Attention, init_kv_cache
        return Attention, init_kv_cache
    if kind == MOE:
        from mamba_jax.layers.moe import MoEMixer
        return MoEMixer, lambda config, batch_size, max_len=None: None   # token-wise: no cache
    if kind == MAMBA_MOE:
        from mamba_jax.layers.mamba_moe import ParallelMambaMoE, init_parallel_cache
        return ParallelMambaMoE, init_parallel_cache
    raise ValueError(f"unknown mixer kind {kind!r}; expected one of 'M', 'M2', 'A', 'E', 'P'")


class ModelCache(NamedTuple):
    """Everything decoding needs to continue a batch of sequences.

    layers: one cache per layer — `LayerCache` (Mamba-1: conv_state, ssm_state), `Mamba2Cache`
      (conv_state, ssm_state per head) or `KVCache` (keys and values preallocated to `max_len`).
    positions: (b,) int32, the number of real (unpadded) tokens each row has consumed — the position id
      of its next token.
    """

    layers: Tuple[Any, ...]
    positions: jax.Array


class LMOutput(NamedTuple):
    """logits: (b, l, vocab_size) float32; cache: the new ModelCache (when one was passed);
    hidden_states: n_layer + 1 residual-stream tensors (b, l, d_model) — the embeddings, then the
    output of each layer (before the final norm) — when `return_hidden_states`."""

    logits: jax.Array
    cache: Optional[ModelCache]
    hidden_states: Optional[Tuple[jax.Array, ...]]


def check_learned_positions(fn: str, positions, n_positions: int, padded: bool) -> None:
    """Learned absolute positions have `n_positions` rows: a position past them would read NaN. Raises
    ValueError when the (static) length of an unpadded chunk, or a concrete position id, is out of range."""
    if not padded and positions.shape[1] > n_positions:
        raise ValueError(f"{fn}: {positions.shape[1]} tokens exceed the {n_positions} learned position embeddings "
                         "(max_position_embeddings)")
    value = concrete_value(positions)
    if value is not None and value.size and (value.max() >= n_positions or value.min() < 0):
        raise ValueError(f"{fn}: position id {int(value.max())} is past the {n_positions} learned position "
                         "embeddings (max_position_embeddings): the sequence (with its cache) is too long")


class DecoderBlock(nn.Module):
    """Pre-norm residual block: h += mixer(norm(h)); h += mlp(mlp_norm(h)) when the config has an MLP.

    h: (b, l, d_model) residual stream (float32 when residual_in_fp32). Returns (h, new layer cache).
    shared_kv_h: optional (b, l, d_model), another stream's residual entering this layer; an attention mixer
    reads its keys and values at earlier positions (`Attention.shared_kv_input`), other mixers ignore it.
    """

    config: BaseLMConfig
    kind: str
    deterministic: bool = True   # False: train-mode mixers (MoE train capacity and jitter)

    @nn.compact
    def __call__(self, h, *, positions, seq_idx=None, mask=None, cache=None, step_caches: bool = False,
                 shared_kv_h=None):
        cfg = self.config.mixer_config(self.kind)
        mixer_cls, _ = mixer_module(self.kind)
        norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="norm")
        normed = norm(h)
        shared = {}
        if shared_kv_h is not None and self.kind == ATTENTION:   # recurrent mixers keep their own state
            shared = {"shared_kv_input": norm(shared_kv_h).astype(cfg.jnp_dtype)}
        out, new_cache = mixer_cls(cfg, name="mixer")(
            normed.astype(cfg.jnp_dtype), positions=positions, seq_idx=seq_idx, mask=mask, cache=cache,
            deterministic=self.deterministic, step_caches=step_caches, **shared)
        h = h + out.astype(h.dtype)
        if cfg.mlp_width:
            normed = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="mlp_norm")(h)
            h = h + GatedMLP(cfg, name="mlp")(normed.astype(cfg.jnp_dtype)).astype(h.dtype)
        return h, new_cache


class LowRankAdapter(nn.Module):
    """x (b, l, d_model) -> (b, l, d_model): up(down(RMSNorm(x))), rank `rank`; `up` starts at zero, so a new
    adapter changes nothing."""

    config: BaseLMConfig
    rank: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        normed = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="norm")(x).astype(cfg.jnp_dtype)
        down = nn.Dense(self.rank, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name="down",
                        kernel_init=nn.initializers.normal(cfg.d_model ** -0.5))(normed)
        return nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name="up",
                        kernel_init=nn.initializers.zeros)(down)


class DecoderLM(nn.Module):
    """A decoder-only language model over any `BaseLMConfig` (see the module docstring).

    `model.apply({"params": params}, input_ids)` → logits (b, l, vocab_size), float32, always.
    `model.apply({"params": params}, input_ids, cache=..., return_hidden_states=..., method="forward")` →
    an `LMOutput` (logits, new cache, hidden states), always: the one way to continue from a cache or to
    read the residual stream.

    Args:
      input_ids: (b, l) int tokens in [0, vocab_size) — or `inputs_embeds` (b, l, d_model) float vectors in
        their place. Called eagerly, a real token outside the vocabulary raises ValueError (naming the id
        and its position); under `jit` ids are clipped into range (padding may hold any id).
      positions: optional (b, l) int position ids (default: counted from `mask`, `seq_idx` and the cache).
      seq_idx: optional (b, l) int; packed sequences: no mixing across a change of id.
      mask: optional (b, l) of 0/1 (checked when concrete), 1 for real tokens and 0 for left padding; a padded
        row gives exactly what the unpadded row gives alone. Masks select, so padding may hold anything.
      cache (`forward` only): a ModelCache (`init_cache`) to continue from; the output carries the new one.
      return_hidden_states (`forward` only): also return the residual stream after the embeddings and after
        each layer.
      deterministic: True (default) evaluates; False trains the layers that behave differently in training
        (MoE: train capacity factor and router jitter). The train step passes False.
    Returns:
      `__call__`: the logits; `forward`: an `LMOutput`.

    `residual_rate` and `adapter_rank` make the stack a rate-accelerated residual stream (M2R2's fast
    stream, `mamba_jax.models.m2r2`): each layer's update is scaled, h ← h + rate · (block(h) − h), and,
    with adapter_rank > 0, a low-rank adapter `adapters_{i}` (RMSNorm → d×r → r×d, the last zero at init)
    adds its own update. The defaults (1.0, 0) are the plain model.

    `head=False` builds the stack alone — no token embeddings, final norm or head — for models that
    bring their own read-in and read-out (e.g. `InContextRegressor`): it takes `inputs_embeds` only and
    returns the residual stream after the last layer (b, l, d_model) in place of the logits.
    """

    config: BaseLMConfig
    head: bool = True
    residual_rate: float = 1.0
    adapter_rank: int = 0
    config_type = BaseLMConfig

    def __post_init__(self):
        if not isinstance(self.config, self.config_type):
            raise ValueError(f"{type(self).__name__}: `config` must be a {self.config_type.__name__}; "
                             f"got {type(self.config).__name__}")
        if not (isinstance(self.residual_rate, (int, float)) and self.residual_rate > 0):
            raise ValueError(f"{type(self).__name__}: `residual_rate` must be a number > 0; got {self.residual_rate!r}")
        if isinstance(self.adapter_rank, bool) or not isinstance(self.adapter_rank, int) or self.adapter_rank < 0:
            raise ValueError(f"{type(self).__name__}: `adapter_rank` must be an int >= 0; got {self.adapter_rank!r}")
        super().__post_init__()

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, seq_idx=None, mask=None,
                 deterministic: bool = True, cache=None, return_hidden_states: bool = False, shared_kv_states=None):
        """The logits (b, l, vocab_size) (see the class docstring); `forward` returns the `LMOutput`."""
        if cache is not None or return_hidden_states:
            raise ValueError(f"{type(self).__name__}: `cache` and `return_hidden_states` are arguments of "
                             "`forward`, which returns an LMOutput (logits, cache, hidden_states): "
                             "model.apply(variables, input_ids, cache=cache, method=\"forward\")")
        return self.forward(input_ids, inputs_embeds=inputs_embeds, positions=positions, seq_idx=seq_idx,
                            mask=mask, deterministic=deterministic, shared_kv_states=shared_kv_states).logits

    @nn.compact
    def forward(self, input_ids=None, *, inputs_embeds=None, positions=None, seq_idx=None, mask=None,
                cache: Optional[ModelCache] = None, return_hidden_states: bool = False,
                deterministic: bool = True, step_caches: bool = False, layer_mask=None,
                shared_kv_states=None) -> "LMOutput":
        """An `LMOutput`: logits, the new cache (None without `cache`), the hidden states (None unless
        `return_hidden_states`). Arguments as the class docstring; `step_caches=True` (with a cache) returns
        a cache whose recurrent layers hold the state after every position of the chunk (a step axis after
        the batch) — `inference.rollback_cache` keeps any prefix of the chunk. `layer_mask` (b, l, n_layer)
        bool: the layers each token runs; a skipped layer passes the token's residual through unchanged
        (SkipDecode, `m2r2.skip_decoding_layer_mask`; exact for attention when a layer skipped at a position
        is skipped at every later one, as later queries then never read keys a skipping token wrote).
        `shared_kv_states` (no cache): at least n_layer arrays (b, l, d_model), another stream's residual
        entering each layer (its `hidden_states`): attention layer i reads that stream's keys and values at
        earlier positions and its own only at the current one — M2R2's fast stream over the slow stream's KV
        cache, in parallel (decoding shares by passing the slow stream's KV caches: `speculative_generate(...,
        share_kv=True)`); recurrent layers keep their own state."""
        cfg = self.config
        name = type(self).__name__
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{name}: pass exactly one of `input_ids` (b, l) and `inputs_embeds` (b, l, d_model)")
        if not self.head and input_ids is not None:
            raise ValueError(f"{name}: a model built with head=False has no token embeddings; pass `inputs_embeds`")
        if input_ids is not None:
            check_array(name, "input_ids", input_ids, ("b", "l"), kind="int")
            b, l = input_ids.shape
        else:
            check_array(name, "inputs_embeds", inputs_embeds, ("b", "l", cfg.d_model))
            b, l = inputs_embeds.shape[:2]
        if mask is not None:
            check_array(name, "mask", mask, (b, l), kind="any")
            check_mask_values(name, "mask", mask)
        if input_ids is not None:
            check_token_ids(name, "input_ids", input_ids, cfg.vocab_size, mask)
        if seq_idx is not None:
            check_array(name, "seq_idx", seq_idx, (b, l), kind="int")
        if positions is not None:
            check_array(name, "positions", positions, (b, l), kind="int")
        kinds = cfg.layer_kinds
        if layer_mask is not None:
            check_array(name, "layer_mask", layer_mask, (b, l, len(kinds)), kind="any")
        if shared_kv_states is not None:
            if cache is not None:
                raise ValueError(f"{name}: `shared_kv_states` is the uncached form of a shared KV cache; with a "
                                 "`cache`, put the other stream's KV caches in it instead")
            if not isinstance(shared_kv_states, (tuple, list)) or len(shared_kv_states) < len(kinds):
                raise ValueError(f"{name}: `shared_kv_states` must be a sequence of at least n_layer={len(kinds)} "
                                 f"arrays (b, l, d_model) (another stream's hidden_states)")
            for i in range(len(kinds)):
                check_array(name, f"shared_kv_states[{i}]", shared_kv_states[i], (b, l, cfg.d_model))
        if cache is not None:
            if not isinstance(cache, ModelCache) or len(cache.layers) != len(kinds):
                raise ValueError(f"{name}: `cache` must be a ModelCache with {len(kinds)} layer caches "
                                 f"(from `init_cache(config, batch_size, max_len)`); got {type(cache).__name__}")
            check_array(name, "cache.positions", cache.positions, (b,), kind="int")

        if self.head:
            embed = nn.Embed(
                cfg.padded_vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.initializer_range), (VOCAB, EMBED)),
                name="embeddings")
        # ids outside [0, vocab_size) would read padding rows of the table (or NaN, or wrap): clip in the graph
        h = (embed(jnp.clip(input_ids, 0, cfg.vocab_size - 1)) if input_ids is not None
             else inputs_embeds.astype(cfg.jnp_dtype))
        if mask is not None:   # select: padding enters the stack as zeros, whatever its embedding holds
            h = jnp.where((mask != 0)[..., None], h, jnp.zeros((), h.dtype))
        if positions is None:
            positions = token_positions(mask, seq_idx, None if cache is None else cache.positions, b, l)
        if cfg.learned_positions:
            check_learned_positions(name, positions, cfg.learned_positions, padded=mask is not None)
            h = h + nn.Embed(
                cfg.learned_positions, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.initializer_range), (None, EMBED)),
                name="position_embeddings")(positions)
        h = constrain_batch(h.astype(jnp.promote_types(jnp.float32, h.dtype) if cfg.residual_in_fp32 else h.dtype))
        hidden_states = [h]
        new_layers = []
        block_cls = nn.remat(DecoderBlock) if cfg.remat and cache is None else DecoderBlock
        for i, kind in enumerate(kinds):
            h_in = h
            h, layer_cache = block_cls(cfg, kind, deterministic, name=f"layers_{i}")(
                h, positions=positions, seq_idx=seq_idx, mask=mask,
                cache=None if cache is None else cache.layers[i],
                shared_kv_h=None if shared_kv_states is None else shared_kv_states[i],
                **({"step_caches": True} if step_caches else {}))   # nn.remat would trace a bool argument
            if self.residual_rate != 1.0:
                h = h_in + self.residual_rate * (h - h_in)
            if self.adapter_rank:
                h = h + LowRankAdapter(cfg, self.adapter_rank, name=f"adapters_{i}")(h_in).astype(h.dtype)
            if layer_mask is not None:
                h = jnp.where(layer_mask[..., i, None] != 0, h, h_in)
            h = constrain_batch(h)   # on a mesh: the residual stream stays batch-sharded (see the function)
            hidden_states.append(h)
            new_layers.append(layer_cache)
        if self.head:
            h = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="norm_f")(h).astype(cfg.jnp_dtype)
            if cfg.tie_embeddings:
                h = embed.attend(h)
            else:
                h = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                             param_dtype=cfg.jnp_param_dtype, name="lm_head",
                             kernel_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(cfg.initializer_range), (EMBED, VOCAB)))(h)
            h = h[..., :cfg.vocab_size]
        logits = h.astype(jnp.promote_types(jnp.float32, h.dtype))
        new_cache = None
        if cache is not None:
            # the next position follows the last token's (packed chunks restart positions per sequence)
            consumed = jnp.full((b,), l) if mask is None else jnp.sum(mask.astype(jnp.int32), axis=1)
            next_positions = jnp.where(consumed > 0, positions[:, -1] + 1, cache.positions)
            new_cache = ModelCache(tuple(new_layers), next_positions.astype(jnp.int32))
        return LMOutput(logits, new_cache, tuple(hidden_states) if return_hidden_states else None)


def needs_max_len(config: BaseLMConfig) -> bool:
    """True when the model has attention layers, whose KV cache is preallocated to a maximum length."""
    return ATTENTION in config.layer_kinds


def init_cache(config: BaseLMConfig, batch_size: int, max_len: Optional[int] = None) -> ModelCache:
    """A fresh ModelCache for `batch_size` sequences.

    max_len: the most tokens (prompt + generated, padding included) a KV cache must hold; required when
    the model has attention layers, ignored otherwise (recurrent state has a fixed size).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"init_cache: `batch_size` must be a positive int; got {batch_size!r}")
    if needs_max_len(config) and (not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"init_cache: the model has attention layers, so `max_len` (the KV cache length, a "
                         f"positive int) is required; got {max_len!r}")
    layers = tuple(mixer_module(kind)[1](config.mixer_config(kind), batch_size, max_len)
                   for kind in config.layer_kinds)
    return ModelCache(layers, jnp.zeros((batch_size,), jnp.int32))


def init_params(model: DecoderLM, rng, seq_len: int = 8):
    """Initialise and unbox the parameters (the logical axis names are read with `param_axes`).

    The initialiser is compiled: much faster than running it op by op for models with many layers."""
    boxed = jax.jit(model.init)(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return nn.meta.unbox(boxed)


def param_axes(model: DecoderLM):
    """The logical axis names of every parameter, as a pytree of PartitionSpec-like tuples."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return nn.get_partition_spec(boxed)
