"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) as M1 trains with it (Wang et al. 2025, arXiv
2504.10449, through veRL): G sampled completions per prompt, a binary verifiable reward, group-normalised
advantages, the PPO clipped surrogate averaged over every completion token, an entropy bonus, no KL to
a reference policy by default.

Pure functions (`group_advantages`, `grpo_loss`, `completion_logprobs`), a jitted update
(`make_grpo_step`) and the rollout → advantages → updates iteration (`rollout`, `grpo_iteration`) over
any `DecoderLM` (Transformer, hybrid, Mamba, Mamba-2): rollouts come from
`mamba_jax.inference.generate_with_logprobs`, whose log-probabilities are those of the tempered
sampling distribution — the update divides the logits by the same temperature.

Shapes: P prompts × G samples = B rollouts, prompt length l, T generated tokens, vocabulary V.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.train.step import TrainState, masked_mean
from mamba_jax.inference import generate_with_logprobs

AGGREGATIONS = ("token_mean", "sequence_mean")


def group_advantages(rewards, eps: float = 1e-6) -> jax.Array:
    """(r − mean) / (std + eps) within each group, the std unbiased (ddof 1), as M1/veRL.

    rewards: (P, G) with G >= 2 samples per prompt -> (P, G) float32. A group whose rewards are all equal
    gets zero advantage (nothing to learn from it).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: `rewards` must be (prompts, samples per prompt >= 2); got shape "
                         f"{rewards.shape}")
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    return (rewards - mean) / (std + eps)


def _aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
    """token_mean: over every masked-in token of the batch; sequence_mean: each row's mean over its tokens,
    then the mean over rows that have any (the original GRPO)."""
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    keep = mask != 0
    counts = keep.sum(axis=1)
    row_means = jnp.where(keep, per_token, 0.0).sum(axis=1) / jnp.maximum(counts, 1)
    return masked_mean(row_means, counts > 0)


def grpo_loss(logp, old_logp, advantages, mask, *, clip_eps: float = 0.2, entropy=None, entropy_coef: float = 0.0,
              ref_logp=None, kl_coef: float = 0.0,
              aggregation: str = "token_mean") -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The GRPO objective to minimise and its metrics.

    Per completion token, with ratio = exp(logp − old_logp) and A the row's advantage:
        max(−A · ratio, −A · clip(ratio, 1 − clip_eps, 1 + clip_eps))
    aggregated by `aggregation` ("token_mean": over all completion tokens, M1; "sequence_mean": per
    sequence then over sequences, the original GRPO), minus entropy_coef × the aggregated `entropy`, plus
    kl_coef × the aggregated KL to a reference policy (the k3 estimator exp(ref − logp) − (ref − logp) − 1,
    clipped to [−10, 10] as veRL's low_var_kl; 0 by default, as M1).

    Args:
      logp, old_logp: (B, T) log-probs of the completion tokens under the policy being trained and the one
        that sampled them; mask: (B, T), nonzero at completion tokens (padding after EOS is 0: its values,
        even NaN, change nothing); advantages: (B,); entropy: optional (B, T) per-token entropy of the
        policy; ref_logp: optional (B, T) log-probs under a reference policy (needed when kl_coef > 0).
    Returns:
      (loss, metrics): metrics has pg_loss, clip_fraction (the share of tokens where the clipped term is
      the larger), approx_kl (k3 estimate of KL(old ‖ new)), entropy and kl_ref (when given).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo_loss: `aggregation` must be one of {AGGREGATIONS}; got {aggregation!r}")
    logp = jnp.asarray(logp)
    if logp.ndim != 2:
        raise ValueError(f"grpo_loss: `logp` must be (batch, tokens); got shape {logp.shape}")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("entropy", entropy), ("ref_logp", ref_logp)):
        if x is not None and jnp.shape(x) != logp.shape:
            raise ValueError(f"grpo_loss: `{name}` must have the shape of `logp` {logp.shape}; got {jnp.shape(x)}")
    if jnp.shape(advantages) != logp.shape[:1]:
        raise ValueError(f"grpo_loss: `advantages` must be ({logp.shape[0]},), one per row; got {jnp.shape(advantages)}")
    if not clip_eps > 0:
        raise ValueError(f"grpo_loss: `clip_eps` must be > 0; got {clip_eps!r}")
    if kl_coef and ref_logp is None:
        raise ValueError("grpo_loss: `ref_logp` is required when kl_coef > 0")
    if entropy_coef and entropy is None:
        raise ValueError("grpo_loss: `entropy` is required when entropy_coef > 0")
    mask = jnp.asarray(mask)
    keep = mask != 0
    log_ratio = jnp.where(keep, logp - old_logp, 0.0)      # padding's values never reach exp
    ratio = jnp.exp(log_ratio)
    a = jnp.asarray(advantages, logp.dtype)[:, None]
    unclipped = -a * ratio
    clipped = -a * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = _aggregate(jnp.maximum(unclipped, clipped), mask, aggregation)
    metrics = {"pg_loss": pg_loss,
               "clip_fraction": _aggregate((clipped > unclipped).astype(logp.dtype), mask, aggregation),
               "approx_kl": _aggregate(jax.lax.stop_gradient(ratio - 1.0 - log_ratio), mask, aggregation)}
    loss = pg_loss
    if entropy is not None:
        metrics["entropy"] = _aggregate(jnp.where(keep, entropy, 0.0), mask, aggregation)
        loss = loss - entropy_coef * metrics["entropy"]
    if ref_logp is not None:
        d = jnp.where(keep, ref_logp - logp, 0.0)
        metrics["kl_ref"] = _aggregate(jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0), mask, aggregation)
        loss = loss + kl_coef * metrics["kl_ref"]
    return loss, metrics


def completion_logprobs(apply_fn: Callable, params, prompt_ids, prompt_mask, completion_ids, *,
                        temperature: float = 1.0) -> Tuple[jax.Array, jax.Array]:
    """Teacher-forced log-probs and entropies of completions, the logits divided by `temperature`.

    prompt_ids, prompt_mask: (B, l) left-padded prompts (mask 0 at padding); completion_ids: (B, T).
    Returns (logp (B, T), entropy (B, T)) float32: position t is the distribution after the prompt and
    completion tokens before t — what `generate_with_logprobs` sampled token t from.
    """
    if not temperature > 0:
        raise ValueError(f"completion_logprobs: `temperature` must be > 0; got {temperature!r}")
    length = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, completion_ids.astype(prompt_ids.dtype)], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), jnp.ones(completion_ids.shape, jnp.int32)], axis=1)
    logits = apply_fn({"params": params}, ids, mask=mask)[:, length - 1:-1].astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(log_probs, completion_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return logp, entropy


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """M1's GRPO settings (veRL): G = 8 samples at T = 0.9, clip 0.2, entropy 0.01, no KL, token-mean
    aggregation, two optimiser steps per rollout batch (its prompts split in two mini-batches). The
    gradient-norm clip (1.0 in M1) and the learning rate belong to the optimiser (`make_optimizer`)."""
    group_size: int = 8
    temperature: float = 0.9
    max_new_tokens: int = 64
    clip_eps: float = 0.2
    entropy_coef: float = 0.01
    kl_coef: float = 0.0
    updates_per_rollout: int = 2
    aggregation: str = "token_mean"

    def __post_init__(self):
        for name in ("group_size", "max_new_tokens", "updates_per_rollout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GRPOConfig: `{name}` must be a positive int; got {value!r}")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig: `group_size` must be >= 2 (advantages compare samples); got "
                             f"{self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"GRPOConfig: `temperature` must be > 0; got {self.temperature!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"GRPOConfig: `aggregation` must be one of {AGGREGATIONS}; got {self.aggregation!r}")


def make_grpo_step(config: GRPOConfig = GRPOConfig(), *, donate: bool = False):
    """A jitted ``step(state, batch) -> (state, metrics)``: one optimiser step on the GRPO loss.

    batch: prompt_ids, prompt_mask (B, l); completion_ids, completion_mask, old_logp (B, T); advantages
    (B,); optional ref_logp (B, T). metrics: loss, grad_norm and `grpo_loss`'s metrics.
    """
    def loss_fn(params, apply_fn, batch):
        logp, entropy = completion_logprobs(apply_fn, params, batch["prompt_ids"], batch["prompt_mask"],
                                            batch["completion_ids"], temperature=config.temperature)
        return grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["completion_mask"],
                         clip_eps=config.clip_eps, entropy=entropy, entropy_coef=config.entropy_coef,
                         ref_logp=batch.get("ref_logp"), kl_coef=config.kl_coef, aggregation=config.aggregation)

    def step(state: TrainState, batch: Dict[str, Any]):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.apply_fn, batch)
        metrics = dict(metrics, loss=loss, grad_norm=jnp.sqrt(sum(jnp.sum(jnp.square(g))
                                                                  for g in jax.tree_util.tree_leaves(grads))))
        return state.apply_gradients(grads=grads), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def rollout(model, params, prompt_ids, prompt_mask, reward_fn: Callable[[np.ndarray], np.ndarray], rng,
            config: GRPOConfig = GRPOConfig(), *, eos_id: Optional[int] = None) -> Tuple[Dict[str, np.ndarray],
                                                                                        np.ndarray]:
    """Sample G completions per prompt and score them.

    prompt_ids, prompt_mask: (P, l) left-padded prompts; reward_fn(tokens (P·G, T)) -> (P·G,) rewards,
    rows grouped by prompt (prompt p's samples are rows p·G .. p·G + G − 1). Returns (batch for
    `make_grpo_step`, rewards (P·G,) float32).
    """
    g = config.group_size
    ids = np.repeat(np.asarray(prompt_ids), g, axis=0)
    mask = np.repeat(np.asarray(prompt_mask), g, axis=0)
    gen = generate_with_logprobs(model, params, jnp.asarray(ids), config.max_new_tokens,
                                 temperature=config.temperature, eos_id=eos_id, rng=rng, prompt_mask=jnp.asarray(mask))
    tokens = np.asarray(gen.tokens)
    rewards = np.asarray(reward_fn(tokens), np.float32)
    if rewards.shape != (tokens.shape[0],):
        raise ValueError(f"rollout: `reward_fn` must return ({tokens.shape[0]},) rewards; got {rewards.shape}")
    advantages = np.asarray(group_advantages(rewards.reshape(-1, g))).reshape(-1)
    batch = {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": tokens,
             "completion_mask": np.asarray(gen.mask), "old_logp": np.asarray(gen.logprobs), "advantages": advantages}
    return batch, rewards


def grpo_iteration(model, state: TrainState, grpo_step: Callable, prompt_ids, prompt_mask,
                   reward_fn: Callable[[np.ndarray], np.ndarray], rng, config: GRPOConfig = GRPOConfig(), *,
                   eos_id: Optional[int] = None) -> Tuple[TrainState, Dict[str, float]]:
    """One GRPO iteration: `rollout` with the current policy, then `config.updates_per_rollout` optimiser
    steps, each on a mini-batch of whole prompt groups (P must divide into them). Returns the new state
    and metrics: the mean over the steps of `make_grpo_step`'s, reward (mean), solved_fraction (groups
    with any reward > 0), zero_advantage_fraction (groups with equal rewards) and completion_length."""
    n_prompts = np.shape(prompt_ids)[0]
    if n_prompts % config.updates_per_rollout:
        raise ValueError(f"grpo_iteration: {n_prompts} prompts do not split into updates_per_rollout="
                         f"{config.updates_per_rollout} mini-batches of whole groups")
    batch, rewards = rollout(model, state.params, prompt_ids, prompt_mask, reward_fn, rng, config, eos_id=eos_id)
    rows = n_prompts * config.group_size // config.updates_per_rollout
    step_metrics = []
    for k in range(config.updates_per_rollout):
        mini = {key: value[k * rows:(k + 1) * rows] for key, value in batch.items()}
        state, metrics = grpo_step(state, mini)
        step_metrics.append(metrics)
    groups = rewards.reshape(n_prompts, config.group_size)
    out = {key: float(np.mean([float(m[key]) for m in step_metrics])) for key in step_metrics[0]}
    out.update(reward=float(rewards.mean()), solved_fraction=float((groups.max(axis=1) > 0).mean()),
               zero_advantage_fraction=float((groups.min(axis=1) == groups.max(axis=1)).mean()),
               completion_length=float(batch["completion_mask"].sum(axis=1).mean()))
    return state, out
