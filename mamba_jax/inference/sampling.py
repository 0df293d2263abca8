"""Token sampling from logits: greedy, temperature, top-k, top-p (nucleus)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not temperature >= 0:
        raise ValueError(f"`temperature` must be >= 0 (0 means greedy); got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"`top_k` must be None or a positive int; got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be None or in (0, 1]; got {top_p!r}")


def filter_logits(logits, top_k: Optional[int] = None, top_p: Optional[float] = None):
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus.

    logits: (b, V). The most likely token always survives.
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep tokens whose preceding mass is < top_p (so the first token is always kept).
        n_keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def sampling_logits(logits, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None):
    """(b, V) float32 logits of the distribution `sample_logits` draws from: divided by the temperature,
    then filtered (at temperature 0, the logits themselves: argmax is what is drawn)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return logits
    return filter_logits(logits / temperature, top_k, top_p)


def sampling_log_probs(logits, temperature: float = 1.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None):
    """(b, V) float32 log-probabilities of the sampling distribution (`sampling_logits`, normalised)."""
    return jax.nn.log_softmax(sampling_logits(logits, temperature, top_k, top_p), axis=-1)


def sample_logits(logits, rng, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
    """Draw one token per row. logits: (b, V) -> (b,) int32. temperature 0 = argmax (rng unused)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, sampling_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)
