"""M2R2's fast residual stream over a frozen decoder (our reading of "Mixture of Multi-Rate Residuals for
Efficient Transformer Inference", arXiv 2502.02040: only the abstract is public, so the design is ours).

The base model (any `DecoderLM`: Transformer, Mamba, hybrids) is the slow stream and stays frozen. The fast
stream is the same embeddings, the first `n_fast` layers and the same final norm and head, with each layer's
update scaled by a rate r (default n_layer / n_fast) and a low-rank accelerator adapter per layer:

    g_0 = h_0 = embed(x);   g_{i+1} = g_i + r · (layer_i(g_i) − g_i) + adapter_i(g_i)

so that after k layers g_k approximates the slow residual h_{r·k} ("early residual alignment"). It is a
`DecoderLM` (`residual_rate`, `adapter_rank`), so it decodes, caches and drafts like any model: as the draft
of `speculative_generate` with the base as target it is lossless self-speculative decoding. Its KV and
recurrent caches are its own (M2R2 shares the KV cache between the streams: a deviation, costing the cache
of n_fast layers). Training (`make_m2r2_train_step`) updates the adapters only, with
`m2r2_loss` = alignment (1 − cosine of the RMS-normalised residuals, g_k against h_{round(r·k)}) + KL(full
model ‖ fast stream) through the shared head.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from mamba_jax.layers.config import BaseLMConfig
from mamba_jax.models.lm import DecoderLM

__all__ = ["adapter_params", "early_exit_point", "early_exit_quality", "exit_logits", "fast_stream",
           "fast_stream_params", "m2r2_loss", "make_m2r2_train_step", "residual_distances", "truncated_config"]


def truncated_config(config: BaseLMConfig, n_layers: int) -> BaseLMConfig:
    """The config of the first `n_layers` layers of `config` (a hybrid keeps the first kinds of its pattern)."""
    total = config.n_layer
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"truncated_config: `n_layers` must be an int in [1, {total}]; got {n_layers!r}")
    if hasattr(config, "pattern"):
        return dataclasses.replace(config, pattern=" ".join(config.layer_kinds[:n_layers]), n_layer=None)
    return dataclasses.replace(config, n_layer=n_layers)


def fast_stream(base: DecoderLM, n_fast: int, *, rank: int = 8, rate: Optional[float] = None) -> DecoderLM:
    """The fast-stream model of `base`: its first `n_fast` layers at `rate` (default n_layer / n_fast) with
    adapters of rank `rank` (0: none, the LayerSkip-style early exit with a rate)."""
    config = truncated_config(base.config, n_fast)
    rate = base.config.n_layer / n_fast if rate is None else rate
    return type(base)(config, residual_rate=float(rate), adapter_rank=rank)


def adapter_params(params) -> Dict[str, Any]:
    """The adapters of fast-stream params (`adapters_{i}`): the only trained part."""
    return {k: v for k, v in params.items() if k.startswith("adapters_")}


def fast_stream_params(fast: DecoderLM, base_params, rng) -> Dict[str, Any]:
    """Fast-stream params: the base's embeddings, first layers, final norm and head (the same arrays), and
    fresh adapters (their `up` projection zero: at init the fast stream is the rate-scaled truncated model)."""
    from mamba_jax.models.lm import init_params

    fresh = init_params(fast, rng)
    shared = {k: base_params[k] for k in fresh if not k.startswith("adapters_")}
    return {**shared, **adapter_params(fresh)}


def _rms_normalised(h):
    h = h.astype(jnp.float32)
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def m2r2_loss(fast: DecoderLM, fast_params, base: DecoderLM, base_params, input_ids, loss_mask=None, *,
              align_weight: float = 1.0, kl_weight: float = 1.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """(loss, metrics) of the fast stream against the frozen full model on input_ids (b, l).

    align: mean over fast layers k = 1..n_fast and unmasked tokens of 1 − cos(g_k, h_{round(r·k)}) (RMS-
    normalised residuals); kl: KL(softmax(full logits) ‖ softmax(fast logits)) per token. loss_mask (b, l)
    selects the tokens (default all). The full model gets no gradient (stop_gradient).
    """
    b, l = input_ids.shape
    mask = jnp.ones((b, l), jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    slow = base.apply({"params": base_params}, input_ids, return_hidden_states=True, method="forward")
    slow_logits = jax.lax.stop_gradient(slow.logits)
    out = fast.apply({"params": fast_params}, input_ids, return_hidden_states=True, method="forward")
    n_fast, rate = len(out.hidden_states) - 1, fast.residual_rate
    total = mask.sum() + 1e-9
    aligns = []
    for k in range(1, n_fast + 1):
        target = jax.lax.stop_gradient(slow.hidden_states[min(round(rate * k), len(slow.hidden_states) - 1)])
        cos = jnp.sum(_rms_normalised(out.hidden_states[k]) * _rms_normalised(target), -1) / out.hidden_states[k].shape[-1]
        aligns.append(jnp.sum((1 - cos) * mask) / total)
    align = jnp.mean(jnp.stack(aligns))
    p_log = jax.nn.log_softmax(slow_logits, -1)
    q_log = jax.nn.log_softmax(out.logits, -1)
    kl = jnp.sum(jnp.sum(jnp.exp(p_log) * (p_log - q_log), -1) * mask) / total
    agree = jnp.sum((jnp.argmax(out.logits, -1) == jnp.argmax(slow_logits, -1)) * mask) / total
    loss = align_weight * align + kl_weight * kl
    return loss, {"loss": loss, "align": align, "kl": kl, "agreement": agree}


def make_m2r2_train_step(fast: DecoderLM, base: DecoderLM, tx: optax.GradientTransformation, *,
                         align_weight: float = 1.0, kl_weight: float = 1.0):
    """A jitted `step(adapters, opt_state, frozen, base_params, input_ids, loss_mask) -> (adapters,
    opt_state, metrics)`: the gradient is taken w.r.t. the adapters only (`adapter_params`); `frozen` (the
    fast stream's shared params) and `base_params` are inputs, never outputs, so they cannot change.
    Start with `opt_state = tx.init(adapters)`."""

    def loss_fn(adapters, frozen, base_params, input_ids, loss_mask):
        return m2r2_loss(fast, {**frozen, **adapters}, base, base_params, input_ids, loss_mask,
                         align_weight=align_weight, kl_weight=kl_weight)

    @jax.jit
    def step(adapters, opt_state, frozen, base_params, input_ids, loss_mask):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters, frozen, base_params, input_ids,
                                                                       loss_mask)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, metrics

    return step


# ---- early exit -------------------------------------------------------------------------------------------

def exit_logits(model: DecoderLM, params, input_ids, n_exits: int):
    """(n_exits, b, l, V) float32 logits of `model`'s stream cut after 1, ..., n_exits layers, each read
    through the shared final norm and head (same rate and adapters as `model`)."""
    out = []
    for k in range(1, n_exits + 1):
        cut = type(model)(truncated_config(model.config, k), residual_rate=model.residual_rate,
                          adapter_rank=model.adapter_rank)
        keep = {name: v for name, v in params.items()
                if not (name.startswith(("layers_", "adapters_")) and int(name.split("_")[1]) >= k)}
        out.append(cut.apply({"params": keep}, input_ids))
    return jnp.stack(out)


def residual_distances(hidden_states):
    """(n_layer, b, l): 1 − cos(h_k, h_{k−1}) for k = 1..n_layer — how much layer k still moves the residual
    (distance-based early exit stops when it is small)."""
    h = jnp.stack([x.astype(jnp.float32) for x in hidden_states])
    cos = jnp.sum(h[1:] * h[:-1], -1) / (jnp.linalg.norm(h[1:], axis=-1) * jnp.linalg.norm(h[:-1], axis=-1) + 1e-9)
    return 1.0 - cos


def early_exit_point(scores, threshold: float, exit_layers, full_layers: int):
    """Where each token stops. scores: (K, b, l) exit scores at the K exits (higher = readier); a token stops
    at the first exit whose score ≥ threshold, else runs all `full_layers`. Returns (exit index (b, l) int32,
    K meaning "no exit", layers run (b, l) float32)."""
    ready = scores >= threshold
    k = scores.shape[0]
    first = jnp.where(jnp.any(ready, 0), jnp.argmax(ready, 0), k).astype(jnp.int32)
    layers = jnp.asarray(list(exit_layers) + [full_layers], jnp.float32)[first]
    return first, layers


def early_exit_quality(exit_logits_, full_logits, targets, first):
    """(agreement with the full model's greedy token, mean NLL of `targets`) of the predictions the tokens
    exit with. exit_logits_: (K, b, l, V); full_logits, targets: (b, l, V), (b, l); first: (b, l) from
    `early_exit_point` (K: the full model's logits)."""
    logits = jnp.concatenate([exit_logits_, full_logits[None]], 0)
    chosen = jnp.take_along_axis(logits, first[None, ..., None], axis=0)[0]            # (b, l, V)
    agree = jnp.mean(jnp.argmax(chosen, -1) == jnp.argmax(full_logits, -1))
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(chosen, -1), targets[..., None], -1))
    return float(agree), float(nll)
