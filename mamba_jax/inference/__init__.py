"""Inference for every DecoderLM (Mamba, Mamba-2, Transformer, hybrids): prefill (chunkable), one-token
step, batched generation — one API over the `ModelCache` pytree (recurrent states and KV caches)."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mamba_jax.inference.sampling import check_sampling_args, filter_logits, sample_logits
from mamba_jax.models.lm import DecoderLM, ModelCache, init_cache
from mamba_jax.ops._checks import check_array

__all__ = ["filter_logits", "generate", "init_cache", "prefill", "sample_logits", "step"]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_len",))
def prefill(model: DecoderLM, params, input_ids, cache: Optional[ModelCache] = None, mask=None, *,
            max_len: Optional[int] = None):
    """Run a prompt (or the next chunk of one) through the model.

    input_ids: (b, l) int; cache: a ModelCache to continue from (a fresh one when None, sized for
    `max_len` tokens when the model has attention — default l); mask: optional (b, l) with 0 at left
    padding. Returns (logits (b, l, vocab) float32, the cache after the last position).
    Prefilling two chunks one after the other equals prefilling their concatenation.
    """
    if cache is None:
        cache = init_cache(model.config, input_ids.shape[0], input_ids.shape[1] if max_len is None else max_len)
    out = model.apply({"params": params}, input_ids, mask=mask, cache=cache)
    return out.logits, out.cache


@functools.partial(jax.jit, static_argnums=0)
def step(model: DecoderLM, params, token_ids, cache: ModelCache):
    """Advance every sequence by one token. token_ids: (b,) int -> (logits (b, vocab), new cache)."""
    check_array("step", "token_ids", token_ids, ("b",), kind="int")
    out = model.apply({"params": params}, token_ids[:, None], cache=cache)
    return out.logits[:, 0], out.cache


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
      prompt_mask: optional (b, l), 1 for real tokens and 0 for left padding; padded rows give
        exactly the tokens their unpadded prompt gives alone. The last column must be real tokens.
    Returns:
      (b, max_new_tokens) int32 generated tokens.
    """
    check_array("generate", "prompt_ids", prompt_ids, ("b", "l"), kind="int")
    if prompt_mask is not None:
        check_array("generate", "prompt_mask", prompt_mask, prompt_ids.shape, kind="any")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: `max_new_tokens` must be a positive int; got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p)
    if temperature > 0 and rng is None:
        raise ValueError("generate: `rng` (a jax.random key) is required when temperature > 0")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    return _generate(model, params, prompt_ids, prompt_mask, rng, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))
def _generate(model, params, prompt_ids, prompt_mask, rng, *, max_new_tokens, temperature, top_k, top_p,
              eos_id):
    logits, cache = prefill(model, params, prompt_ids, None, prompt_mask,
                            max_len=prompt_ids.shape[1] + max_new_tokens)
    done = jnp.zeros(prompt_ids.shape[:1], bool)

    def body(carry, _):
        last_logits, cache, rng, done = carry
        rng, sub = jax.random.split(rng)
        token = sample_logits(last_logits, sub, temperature, top_k, top_p)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        next_logits, cache = step(model, params, token, cache)
        return (next_logits, cache, rng, done), token

    _, tokens = jax.lax.scan(body, (logits[:, -1], cache, rng, done), None, length=max_new_tokens)
    return tokens.T
