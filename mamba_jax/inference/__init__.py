"""Inference for every DecoderLM (Mamba, Mamba-2, Transformer, hybrids): prefill (chunkable), one-token
step, batched generation — one API over the `ModelCache` pytree (recurrent states and KV caches)."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.inference.sampling import check_sampling_args, filter_logits, sample_logits, sampling_log_probs
from mamba_jax.layers.attention import KVCache
from mamba_jax.models.lm import DecoderLM, ModelCache, init_cache
from mamba_jax.ops._checks import (check_array, check_left_padded, check_mask_values, check_token_ids,
                                   concrete_value)

__all__ = ["Generation", "SpeculativeStats", "filter_logits", "generate", "generate_with_logprobs", "init_cache",
           "prefill", "rollback_cache", "sample_logits", "speculative_generate", "step"]


def _kv_slots(cache: Optional[ModelCache]):
    """(next slot, max_len) of the cache's first KV cache when both are known (concrete), else None."""
    if cache is None:
        return None
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            index = concrete_value(layer.index)
            return None if index is None else (int(index), layer.key.shape[1])
    return None


def _real_tokens(n_columns: int, mask) -> int:
    """The most real tokens in a row of a chunk: its columns, or the largest row sum of a concrete mask."""
    m = concrete_value(mask)
    return n_columns if m is None else int((m != 0).sum(axis=1).max(initial=0))


def _check_fits(fn: str, model: DecoderLM, cache: Optional[ModelCache], n_columns: int, n_real: int) -> None:
    """KV cache overflow and learned positions past their table are errors, not NaN or a silent overwrite.
    n_columns: slots the chunk writes (padding included); n_real: the most real tokens a row adds."""
    slots = _kv_slots(cache)
    if slots is not None and slots[0] + n_columns > slots[1]:
        raise ValueError(f"{fn}: the KV cache holds {slots[1]} slots, {slots[0]} of them used: no room for "
                         f"{n_columns} more token(s) (size the cache with `init_cache(config, batch, max_len)` for "
                         "the prompt, its padding and every generated token)")
    n_pos = model.config.learned_positions
    used = 0 if cache is None else concrete_value(cache.positions)
    if n_pos and used is not None and int(np.max(used, initial=0)) + n_real > n_pos:
        raise ValueError(f"{fn}: {int(np.max(used, initial=0)) + n_real} positions exceed the model's {n_pos} "
                         "learned position embeddings (max_position_embeddings)")


def prefill(model: DecoderLM, params, input_ids, cache: Optional[ModelCache] = None, mask=None, *,
            max_len: Optional[int] = None):
    """Run a prompt (or the next chunk of one) through the model.

    input_ids: (b, l) int in [0, vocab_size); cache: a ModelCache to continue from (a fresh one when None,
    sized for `max_len` tokens when the model has attention — default l); mask: optional (b, l) of 0/1 with 0
    at left padding (padding may hold any id). Returns (logits (b, l, vocab) float32, the cache after the
    last position). Prefilling two chunks one after the other equals prefilling their concatenation.
    Raises ValueError (when the arrays are concrete) for an id outside the vocabulary at a real position, a
    mask value other than 0/1, a chunk that overflows the KV cache, or positions past learned embeddings.
    """
    check_array("prefill", "input_ids", input_ids, ("b", "l"), kind="int")
    if mask is not None:
        check_array("prefill", "mask", mask, input_ids.shape, kind="any")
        check_mask_values("prefill", "mask", mask)
    check_token_ids("prefill", "input_ids", input_ids, model.config.vocab_size, mask)
    if cache is None and max_len is not None and max_len < input_ids.shape[1]:
        raise ValueError(f"prefill: `max_len`={max_len} is shorter than the prompt ({input_ids.shape[1]} tokens)")
    _check_fits("prefill", model, cache, input_ids.shape[1], _real_tokens(input_ids.shape[1], mask))
    return _prefill(model, params, input_ids, cache, mask, max_len=max_len)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_len",))
def _prefill(model: DecoderLM, params, input_ids, cache, mask, *, max_len):
    if cache is None:
        cache = init_cache(model.config, input_ids.shape[0], input_ids.shape[1] if max_len is None else max_len)
    out = model.apply({"params": params}, input_ids, mask=mask, cache=cache, method="forward")
    return out.logits, out.cache


def step(model: DecoderLM, params, token_ids, cache: ModelCache):
    """Advance every sequence by one token. token_ids: (b,) int -> (logits (b, vocab), new cache).

    Raises ValueError when the KV cache is full (its index is read from the device: one scalar) or, for
    concrete ids, when one is outside the vocabulary. Inside `jit` (as in `generate`) the jitted step runs
    without those checks: ids are clipped into range and an overflowing KV cache gives NaN logits."""
    check_array("step", "token_ids", token_ids, ("b",), kind="int")
    check_token_ids("step", "token_ids", token_ids, model.config.vocab_size)
    _check_fits("step", model, cache, 1, 1)
    return _step(model, params, token_ids, cache)


@functools.partial(jax.jit, static_argnums=0)
def _step(model: DecoderLM, params, token_ids, cache: ModelCache):
    out = model.apply({"params": params}, token_ids[:, None], cache=cache, method="forward")
    return out.logits[:, 0], out.cache


class Generation(NamedTuple):
    """What `generate_with_logprobs` returns, each (b, max_new_tokens).

    tokens: int32 generated tokens (after a row's EOS: EOS again).
    logprobs: float32 log-probability of each token under the distribution it was drawn from: the
      logits divided by the temperature, after top-k / top-p filtering (at temperature 0: the plain
      softmax of the logits); 0 after EOS.
    mask: bool, True for the tokens a row generated up to and including its first EOS (every token
      without `eos_id`) — the completion tokens a loss should see.
    """
    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array


def generate(model: DecoderLM, params, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             rng=None, prompt_mask=None):
    """Batched autoregressive generation with the model's cache, compiled once per shape.

    Args:
      prompt_ids: (b, l) int prompts, left-padded when their lengths differ.
      max_new_tokens: number of tokens to generate (static).
      temperature: 0 for greedy decoding; > 0 samples (needs `rng`).
      top_k, top_p: optional filters applied before sampling.
      eos_id: once a row emits it, the row keeps emitting `eos_id`.
      rng: a jax PRNG key (required when temperature > 0).
      prompt_mask: optional (b, l) of 0/1, 1 for real tokens and 0 for left padding; padded rows give
        exactly the tokens their unpadded prompt gives alone. It must be left-padded (each row zeros then
        ones, the last column real): a right-padded mask raises ValueError.
    Returns:
      (b, max_new_tokens) int32 generated tokens (`generate_with_logprobs` also gives their log-probs).
    """
    return _checked_generate("generate", model, params, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                             eos_id, rng, prompt_mask, with_logprobs=False).tokens


def generate_with_logprobs(model: DecoderLM, params, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
                           top_k: Optional[int] = None, top_p: Optional[float] = None,
                           eos_id: Optional[int] = None, rng=None, prompt_mask=None) -> Generation:
    """`generate`, returning a `Generation`: the tokens, the log-probability each was sampled with and the
    mask of completion tokens (up to the first EOS) — the rollouts of policy-gradient training
    (`mamba_jax.rl`). Same arguments and checks as `generate`; the same tokens for the same rng.
    """
    return _checked_generate("generate_with_logprobs", model, params, prompt_ids, max_new_tokens, temperature, top_k,
                             top_p, eos_id, rng, prompt_mask, with_logprobs=True)


def _checked_generate(fn: str, model, params, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id, rng,
                      prompt_mask, *, with_logprobs: bool) -> Generation:
    check_array(fn, "prompt_ids", prompt_ids, ("b", "l"), kind="int")
    if prompt_mask is not None:
        check_array(fn, "prompt_mask", prompt_mask, prompt_ids.shape, kind="any")
        check_mask_values(fn, "prompt_mask", prompt_mask)
        check_left_padded(fn, "prompt_mask", prompt_mask)
    check_token_ids(fn, "prompt_ids", prompt_ids, model.config.vocab_size, prompt_mask)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{fn}: `max_new_tokens` must be a positive int; got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < model.config.vocab_size):
        raise ValueError(f"{fn}: `eos_id` must be None or an int in [0, vocab_size={model.config.vocab_size}); "
                         f"got {eos_id!r}")
    n_pos, n_prompt = model.config.learned_positions, _real_tokens(prompt_ids.shape[1], prompt_mask)
    if n_pos and n_prompt + max_new_tokens > n_pos:
        raise ValueError(f"{fn}: the prompt ({n_prompt} real tokens) and {max_new_tokens} new tokens exceed the "
                         f"model's {n_pos} learned position embeddings (max_position_embeddings)")
    if temperature > 0 and rng is None:
        raise ValueError(f"{fn}: `rng` (a jax.random key) is required when temperature > 0")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    return _generate(model, params, prompt_ids, prompt_mask, rng, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id,
                     with_logprobs=with_logprobs)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "with_logprobs"))
def _generate(model, params, prompt_ids, prompt_mask, rng, *, max_new_tokens, temperature, top_k, top_p,
              eos_id, with_logprobs):
    logits, cache = _prefill(model, params, prompt_ids, None, prompt_mask,
                             max_len=prompt_ids.shape[1] + max_new_tokens)
    done = jnp.zeros(prompt_ids.shape[:1], bool)

    def body(carry, _):
        last_logits, cache, rng, done = carry
        rng, sub = jax.random.split(rng)
        token = sample_logits(last_logits, sub, temperature, top_k, top_p)
        logprob = jnp.zeros(token.shape, jnp.float32)      # plain `generate` skips the softmax on its hot path
        if with_logprobs:
            logprob = jnp.take_along_axis(sampling_log_probs(last_logits, temperature, top_k, top_p),
                                          token[:, None], axis=-1)[:, 0]
        live = ~done
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        next_logits, cache = _step(model, params, token, cache)
        return (next_logits, cache, rng, done), (token, jnp.where(live, logprob, 0.0), live)

    _, (tokens, logprobs, live) = jax.lax.scan(body, (logits[:, -1], cache, rng, done), None, length=max_new_tokens)
    return Generation(tokens.T, logprobs.T, live.T)


from mamba_jax.inference.speculative import SpeculativeStats, rollback_cache, speculative_generate  # noqa: E402
