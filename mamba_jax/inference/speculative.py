"""Lossless speculative decoding (Leviathan et al. 2023, Chen et al. 2023) for every DecoderLM family.

Each round, a small draft model proposes `num_draft` tokens one step at a time; the target scores all of
them in one chunked call (`forward(..., step_caches=True)`) and keeps the longest acceptable prefix plus
one token of its own, so a round costs one target call and yields 1 to num_draft + 1 tokens:

- greedy (temperature 0): accept while the draft token is the target's argmax, then add the target's
  argmax — exactly the tokens of greedy `generate` with the target;
- sampling: accept draft token d with probability min(1, p(d) / q(d)); at the first rejection draw from
  normalise(max(0, p − q)); when all are accepted draw a bonus token from the target's next distribution.
  p and q are the target's and the draft's sampling distributions (the same temperature / top-k / top-p
  for both), so the output is distributed exactly as sampling from the target alone.

Shared KV cache (`share_kv=True`, M2R2's self-speculative decoding): a draft made of the target's first
layers (`models.m2r2.fast_stream`) drafts over the target's own KV caches — its attention layer i reads the
keys and values the target's layer i wrote for every accepted token, and its draft tokens' keys and values
go into slots the verify call then overwrites. The draft keeps no cache and needs no prefill.

Rollback: rows of a batch accept different lengths. A recurrent layer (Mamba, Mamba-2) takes the state
after the last kept position from the per-position states of the verify call (target) or of the draft's
steps; a KV cache marks the rejected slots invalid and moves its write index past the longest kept prefix
of the batch (`rollback_cache`). No cache ever continues from a rejected token.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.inference.sampling import check_sampling_args, sampling_logits
from mamba_jax.layers.attention import KVCache
from mamba_jax.layers.config import ATTENTION, MOE
from mamba_jax.models.lm import DecoderLM, ModelCache, init_cache
from mamba_jax.ops._checks import check_array, check_left_padded, check_mask_values, check_token_ids

__all__ = ["SpeculativeStats", "acceptance_probability", "check_shared_kv", "greedy_verify", "kv_slots_for_speculation",
           "residual_distribution", "rollback_cache", "sampling_verify", "speculative_generate"]


class SpeculativeStats(NamedTuple):
    """What a `speculative_generate` call measured (Python numbers).

    acceptance_rate: accepted draft tokens / proposed draft tokens, over the rounds each row was live.
    mean_accepted_length: τ, the mean number of tokens a row gains per target call (accepted + 1).
    target_calls: rounds of draft-then-verify (one target call each; the prompt's prefill not counted).
    draft_calls: one-token draft steps (num_draft + 1 per round: the last one feeds the final draft token).
    """
    acceptance_rate: float
    mean_accepted_length: float
    target_calls: int
    draft_calls: int


# ---- the acceptance rules: pure functions of the two models' outputs ---------------------------------------

def _leading_true(accept):
    """(b, K) bool -> (b,) int32, the number of leading True entries of each row."""
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def greedy_verify(target_logits, draft_tokens):
    """Greedy acceptance. target_logits: (b, K+1, V), the target's logits at the pending token and at each
    draft token; draft_tokens: (b, K) int. Returns (n_accepted (b,) int32 in [0, K], next_token (b,) int32):
    the longest prefix of draft tokens equal to the target's argmax, then the target's argmax after it."""
    choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)                    # (b, K+1)
    n = _leading_true(draft_tokens == choice[:, :-1])
    return n, jnp.take_along_axis(choice, n[:, None], axis=1)[:, 0]


def acceptance_probability(p_token, q_token):
    """min(1, p / q): the probability of keeping a draft token the draft drew with probability q_token > 0
    and the target gives p_token. Any shape, float."""
    return jnp.minimum(1.0, p_token / jnp.maximum(q_token, jnp.finfo(jnp.result_type(q_token)).tiny))


def residual_distribution(p, q):
    """normalise(max(0, p − q)) over the last axis: where to draw after a rejection. p, q: (..., V)
    probabilities. Where p ≤ q everywhere (a rejection then has probability 0) it returns p."""
    r = jnp.maximum(p - q, 0.0)
    total = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p)


def sampling_verify(target_probs, draft_probs, draft_tokens, rng):
    """The lossless sampling rule. target_probs: (b, K+1, V), draft_probs: (b, K, V) (each row a
    distribution), draft_tokens: (b, K) drawn from draft_probs. Returns (n_accepted (b,) int32, next_token
    (b,) int32): draft token i is kept with probability `acceptance_probability` while all before it were
    kept; the next token is drawn from `residual_distribution` at the first rejection, or from
    target_probs[:, K] when all K were kept."""
    b, k = draft_tokens.shape
    u_key, next_key = jax.random.split(rng)
    pick = lambda probs: jnp.take_along_axis(probs, draft_tokens[..., None], axis=-1)[..., 0]
    accept = jax.random.uniform(u_key, (b, k)) < acceptance_probability(pick(target_probs[:, :k]), pick(draft_probs))
    n = _leading_true(accept)
    dists = jnp.concatenate([residual_distribution(target_probs[:, :k], draft_probs), target_probs[:, k:]], axis=1)
    chosen = jnp.take_along_axis(dists, n[:, None, None], axis=1)[:, 0]                # (b, V)
    next_token = jax.random.categorical(next_key, jnp.log(chosen), axis=-1).astype(jnp.int32)
    return n, next_token


# ---- caches --------------------------------------------------------------------------------------------------

def rollback_cache(before: ModelCache, after: ModelCache, n_keep) -> ModelCache:
    """The cache after consuming only the first n_keep[r] tokens of a chunk, row by row.

    before: the cache the chunk continued; after: the cache after the whole chunk of l tokens, its recurrent
    layers holding the state after every position (a step axis after the batch: `forward(...,
    step_caches=True)`, or the draft's stacked steps); n_keep: (b,) int in [1, l]. KV caches keep the
    keys and values but mark slots past each row's kept prefix invalid, and resume writing after the
    longest kept prefix; positions advance by n_keep."""
    n_keep = n_keep.astype(jnp.int32)
    layers = []
    for old, new in zip(before.layers, after.layers):
        if new is None:
            layers.append(None)
        elif isinstance(new, KVCache):
            slots = jnp.arange(new.valid.shape[1], dtype=jnp.int32)
            kept = slots[None, :] < (old.index + n_keep)[:, None]
            layers.append(new._replace(valid=new.valid & kept, index=old.index + jnp.max(n_keep)))
        else:
            layers.append(type(new)(*(jnp.take_along_axis(
                s, (n_keep - 1).reshape((-1,) + (1,) * (s.ndim - 1)), axis=1)[:, 0] for s in new)))
    return ModelCache(tuple(layers), before.positions + n_keep)


def kv_slots_for_speculation(prompt_len: int, batch_size: int, max_new_tokens: int, num_draft: int) -> int:
    """KV-cache slots a speculative run may write: the prompt, then per round the longest kept prefix of
    the batch (≤ num_draft + 1). A row gains ≥ 1 token per round, so the total is ≤ min(b, num_draft + 1)
    · (max_new_tokens + num_draft) after the prompt (max_new_tokens + num_draft for one row)."""
    return prompt_len + min(batch_size, num_draft + 1) * (max_new_tokens + num_draft)


def check_shared_kv(target_config, draft_config) -> None:
    """Raise ValueError unless a draft of `draft_config` can draft over the KV caches of a target of
    `target_config` (`speculative_generate(..., share_kv=True)`): its layer kinds are the target's first,
    it has attention and no recurrent layers, and its KV caches have the target's shape and dtype."""
    fn = "speculative_generate"
    kinds, target_kinds = draft_config.layer_kinds, target_config.layer_kinds
    if tuple(target_kinds[:len(kinds)]) != tuple(kinds):
        raise ValueError(f"{fn}: share_kv=True needs the draft's layers {' '.join(kinds)!r} to be the target's "
                         f"first layers ({' '.join(target_kinds)!r}), as a fast stream's are")
    if ATTENTION not in kinds:
        raise ValueError(f"{fn}: share_kv=True: the draft has no attention layer, so no KV cache to share")
    recurrent = sorted({kind for kind in kinds if kind not in (ATTENTION, MOE)})
    if recurrent:
        raise ValueError(f"{fn}: share_kv=True takes drafts of attention and MoE layers only; the draft has "
                         f"recurrent layers {recurrent}, which would need their own prefill over the shared keys")
    for i, kind in enumerate(kinds):
        if kind == ATTENTION:
            mine, theirs = draft_config.mixer_config(kind), target_config.mixer_config(kind)
            shape = lambda c: (c.kv_heads, c.head_dim_value, c.jnp_dtype)  # noqa: E731
            if shape(mine) != shape(theirs):
                raise ValueError(f"{fn}: share_kv=True: layer {i}'s KV cache (kv_heads, head_dim, dtype) is "
                                 f"{shape(mine)} in the draft but {shape(theirs)} in the target")


def _stack_steps(caches):
    """Per-step layer caches stacked by `scan` (steps, b, ...) -> (b, steps, ...); KV layers are None."""
    return tuple(None if c is None else type(c)(*(jnp.moveaxis(s, 0, 1) for s in c)) for c in caches)


def _recurrent_layers(cache: ModelCache):
    return tuple(None if isinstance(c, KVCache) else c for c in cache.layers)


# ---- generation ----------------------------------------------------------------------------------------------

def speculative_generate(target: DecoderLM, target_params, draft: DecoderLM, draft_params, prompt_ids,
                         max_new_tokens: int, *, num_draft: int = 4, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None, prompt_mask=None,
                         eos_id: Optional[int] = None, share_kv: bool = False):
    """Generate with `target`, `draft` proposing `num_draft` tokens per target call (see the module docstring).

    Args: as `generate` — prompt_ids (b, l) int, left-padded with `prompt_mask` (b, l) 0/1 when lengths
      differ; temperature 0 is greedy; top_k / top_p filter both models' distributions; rng a jax key
      (required when temperature > 0); eos_id: a row that emits it keeps emitting it. Any family may be the
      target or the draft (Transformer, Mamba, Mamba-2, hybrids); they must share the vocabulary.
      share_kv: the draft reads and writes the target's KV caches (see the module docstring); the draft's
      layer kinds must be the first of the target's, with attention layers of the same KV shape and no
      recurrent layers (a recurrent draft layer would need its own prefill over the shared keys).
    Returns:
      (tokens (b, max_new_tokens) int32, SpeculativeStats). Greedy tokens equal greedy `generate` with the
      target; sampled tokens are distributed as `generate` with the target samples them.
    """
    fn = "speculative_generate"
    check_array(fn, "prompt_ids", prompt_ids, ("b", "l"), kind="int")
    if prompt_mask is not None:
        check_array(fn, "prompt_mask", prompt_mask, prompt_ids.shape, kind="any")
        check_mask_values(fn, "prompt_mask", prompt_mask)
        check_left_padded(fn, "prompt_mask", prompt_mask)
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(f"{fn}: the draft's vocab_size ({draft.config.vocab_size}) must equal the target's ({vocab})")
    check_token_ids(fn, "prompt_ids", prompt_ids, vocab, prompt_mask)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"{fn}: `max_new_tokens` must be a positive int; got {max_new_tokens!r}")
    if not isinstance(num_draft, int) or isinstance(num_draft, bool) or num_draft < 1:
        raise ValueError(f"{fn}: `num_draft` (draft tokens per target call) must be a positive int; got {num_draft!r}")
    check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < vocab):
        raise ValueError(f"{fn}: `eos_id` must be None or an int in [0, vocab_size={vocab}); got {eos_id!r}")
    n_prompt = prompt_ids.shape[1] if prompt_mask is None else int(np.max(np.sum(np.asarray(prompt_mask) != 0, 1)))
    for name, model in (("target", target), ("draft", draft)):
        n_pos = model.config.learned_positions
        if n_pos and n_prompt + max_new_tokens + num_draft > n_pos:
            raise ValueError(f"{fn}: the prompt ({n_prompt} real tokens), {max_new_tokens} new tokens and "
                             f"{num_draft} draft tokens exceed the {name}'s {n_pos} learned position embeddings")
    if temperature > 0 and rng is None:
        raise ValueError(f"{fn}: `rng` (a jax.random key) is required when temperature > 0")
    if share_kv:
        check_shared_kv(target.config, draft.config)
    tokens, counts = _speculative(target, target_params, draft, draft_params, prompt_ids, prompt_mask,
                                  jax.random.PRNGKey(0) if rng is None else rng, max_new_tokens=max_new_tokens,
                                  num_draft=num_draft, temperature=float(temperature), top_k=top_k, top_p=top_p,
                                  eos_id=eos_id, share_kv=bool(share_kv))
    rounds, accepted, proposed, calls = (int(c) for c in jax.device_get(counts))
    stats = SpeculativeStats(acceptance_rate=accepted / max(proposed, 1),
                             mean_accepted_length=(accepted + rounds) / max(rounds, 1),
                             target_calls=calls, draft_calls=calls * (num_draft + 1))
    return tokens, stats


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames=(
    "max_new_tokens", "num_draft", "temperature", "top_k", "top_p", "eos_id", "share_kv"))
def _speculative(target, target_params, draft, draft_params, prompt_ids, prompt_mask, rng, *, max_new_tokens,
                 num_draft, temperature, top_k, top_p, eos_id, share_kv):
    b, l = prompt_ids.shape
    k = num_draft
    n_draft_layers = len(draft.config.layer_kinds)
    slots = kv_slots_for_speculation(l, b, max_new_tokens, k)
    caches = []
    for model, params in ((target, target_params),) + (() if share_kv else ((draft, draft_params),)):
        cache = init_cache(model.config, b, slots)
        if l > 1:   # every token but the last: the last is the first input of the first round
            cache = model.apply({"params": params}, prompt_ids[:, :-1], cache=cache, method="forward",
                                mask=None if prompt_mask is None else prompt_mask[:, :-1]).cache
        caches.append(cache)
    probs = lambda logits: jax.nn.softmax(sampling_logits(logits, temperature, top_k, top_p), axis=-1)

    def draft_round(cache, first, key):
        """num_draft + 1 draft steps from `first`: (tokens (b, K), q (b, K, V), final cache, step caches)."""
        def body(carry, key):
            cache, token = carry
            out = draft.apply({"params": draft_params}, token[:, None], cache=cache, method="forward")
            logits = out.logits[:, 0]
            if temperature == 0.0:
                nxt, q = jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros((b, 0), jnp.float32)
            else:
                nxt = jax.random.categorical(key, sampling_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)
                q = probs(logits)
            return (out.cache, nxt), (nxt, q, _recurrent_layers(out.cache))

        (cache_end, _), (tokens, q, steps) = jax.lax.scan(body, (cache, first), jax.random.split(key, k + 1))
        return tokens[:k].T, jnp.moveaxis(q[:k], 0, 1), cache_end, _stack_steps(steps)

    def body(state):
        t_cache, d_cache, last, out, count, done, rng, totals = state
        rng, draft_key, verify_key = jax.random.split(rng, 3)
        live = (count < max_new_tokens) & ~done
        if share_kv:   # the target's caches of the draft's layers, as the last verify call left them
            d_cache = ModelCache(t_cache.layers[:n_draft_layers], t_cache.positions)
        draft_tokens, q, d_end, d_steps = draft_round(d_cache, last, draft_key)
        chunk = jnp.concatenate([last[:, None], draft_tokens], axis=1)                        # (b, K+1)
        v_cache = t_cache
        if share_kv:   # verify over the caches the draft wrote: its K+1 slots are the chunk's, all overwritten,
            # and the target's own copies are dead, so XLA need not copy the shared layers every round
            shared = tuple(None if d is None else d._replace(index=t.index)
                           for d, t in zip(d_end.layers, t_cache.layers))
            v_cache = ModelCache(shared + t_cache.layers[n_draft_layers:], t_cache.positions)
        verified = target.apply({"params": target_params}, chunk, cache=v_cache, method="forward", step_caches=True)
        if temperature == 0.0:
            n, nxt = greedy_verify(verified.logits, draft_tokens)
        else:
            n, nxt = sampling_verify(probs(verified.logits), q, draft_tokens, verify_key)
        n_keep = jnp.where(live, n + 1, 1)   # finished rows keep one token: their slots stay few
        t_cache = rollback_cache(t_cache, verified.cache, n_keep)
        if share_kv:
            d_cache = None
        else:
            d_after = ModelCache(tuple(s if s is not None else e for s, e in zip(d_steps, d_end.layers)),
                                 d_end.positions)
            d_cache = rollback_cache(d_cache, d_after, n_keep)
        new = jnp.where(jnp.arange(k + 1)[None] == n[:, None], nxt[:, None],
                        jnp.concatenate([draft_tokens, draft_tokens[:, :1]], axis=1))       # d_1..d_n, next
        cols = count[:, None] + jnp.arange(k + 1)[None]
        write = live[:, None] & (jnp.arange(k + 1)[None] <= n[:, None])
        rows = jnp.arange(b)[:, None]
        out = out.at[rows, cols].set(jnp.where(write, new, out[rows, cols]))
        if eos_id is not None:
            done = done | (live & jnp.any(write & (new == eos_id) & (cols < max_new_tokens), axis=1))
        count = count + jnp.where(live, n + 1, 0)
        n_live = jnp.sum(live.astype(jnp.int32))
        totals = totals + jnp.stack([n_live, jnp.sum(jnp.where(live, n, 0)), n_live * k, jnp.int32(1)])
        return t_cache, d_cache, nxt, out, count, done, rng, totals

    def cond(state):
        count, done = state[4], state[5]
        return jnp.any((count < max_new_tokens) & ~done)

    init = (caches[0], None if share_kv else caches[1], prompt_ids[:, -1].astype(jnp.int32),
            jnp.zeros((b, max_new_tokens + k + 1), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool),
            rng, jnp.zeros((4,), jnp.int32))
    state = jax.lax.while_loop(cond, body, init)
    tokens = state[3][:, :max_new_tokens]
    if eos_id is not None:   # after a row's first EOS: EOS again, as `generate`
        seen = jnp.cumsum((tokens == eos_id).astype(jnp.int32), axis=1) > 0
        tokens = jnp.where(seen, eos_id, tokens)
    return tokens, state[7]
