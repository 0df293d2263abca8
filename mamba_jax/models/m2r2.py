"""M2R2's fast residual stream over a frozen decoder (our reading of "Mixture of Multi-Rate Residuals for
Efficient Transformer Inference", arXiv 2502.02040: only the abstract is public, so the design is ours).

The base model (any `DecoderLM`: Transformer, Mamba, hybrids) is the slow stream and stays frozen. The fast
stream is the same embeddings, the first `n_fast` layers and the same final norm and head, with each layer's
update scaled by a rate r (default n_layer / n_fast) and a low-rank accelerator adapter per layer:

    g_0 = h_0 = embed(x);   g_{i+1} = g_i + r · (layer_i(g_i) − g_i) + adapter_i(g_i)

so that after k layers g_k approximates the slow residual h_{r·k} ("early residual alignment"). It is a
`DecoderLM` (`residual_rate`, `adapter_rank`), so it decodes, caches and drafts like any model: as the draft
of `speculative_generate` with the base as target it is lossless self-speculative decoding. Training
(`make_m2r2_train_step`) updates the adapters only, with `m2r2_loss` = alignment (1 − cosine of the
RMS-normalised residuals, g_k against h_{round(r·k)}) + KL(full model ‖ fast stream) through the shared head.

The KV cache is shared (`shared_kv=True`, M2R2's design): the fast stream's attention layer i reads the keys
and values the slow stream's layer i wrote for earlier tokens, and its own only for the current token. In
training and early exit that is `forward(..., shared_kv_states=<the slow stream's hidden_states>)`; in
decoding the fast stream drafts over the base's KV caches (`speculative_generate(..., share_kv=True)`), so it
keeps no cache of its own. With `shared_kv=False` the fast stream is a model of its own, caches included.
Recurrent layers (hybrids) always keep their own state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from mamba_jax.layers.config import BaseLMConfig
from mamba_jax.models.lm import DecoderLM

__all__ = ["adapter_params", "early_exit_point", "early_exit_quality", "exit_logits", "expert_hit_rate",
           "expert_prediction_hit_rates", "fast_stream", "fast_stream_params", "layer_router", "m2r2_loss",
           "make_m2r2_train_step", "offload_decode_latency", "prediction_quality", "residual_distances", "route_top_k",
           "skip_decoding_layer_mask", "truncated_config"]


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
              seq_idx=None, align_weight: float = 1.0, kl_weight: float = 1.0,
              shared_kv: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """(loss, metrics) of the fast stream against the frozen full model on input_ids (b, l).

    align: mean over fast layers k = 1..n_fast and unmasked tokens of 1 − cos(g_k, h_{round(r·k)}) (RMS-
    normalised residuals); kl: KL(softmax(full logits) ‖ softmax(fast logits)) per token. loss_mask (b, l)
    selects the tokens (default all); seq_idx (b, l): packed documents, as the models take it. The full model
    gets no gradient (stop_gradient). shared_kv: the fast stream's attention reads the slow stream's keys and
    values at earlier positions (see the module docstring).
    """
    b, l = input_ids.shape
    mask = jnp.ones((b, l), jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    slow = base.apply({"params": base_params}, input_ids, seq_idx=seq_idx, return_hidden_states=True,
                      method="forward")
    slow_logits = jax.lax.stop_gradient(slow.logits)
    shared = jax.lax.stop_gradient(slow.hidden_states) if shared_kv else None
    out = fast.apply({"params": fast_params}, input_ids, seq_idx=seq_idx, return_hidden_states=True,
                     shared_kv_states=shared, method="forward")
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
                         align_weight: float = 1.0, kl_weight: float = 1.0, shared_kv: bool = False):
    """A jitted `step(adapters, opt_state, frozen, base_params, input_ids, loss_mask, seq_idx=None) -> (adapters,
    opt_state, metrics)`: the gradient is taken w.r.t. the adapters only (`adapter_params`); `frozen` (the
    fast stream's shared params) and `base_params` are inputs, never outputs, so they cannot change.
    Start with `opt_state = tx.init(adapters)`. shared_kv: as `m2r2_loss`."""

    def loss_fn(adapters, frozen, base_params, input_ids, loss_mask, seq_idx):
        return m2r2_loss(fast, {**frozen, **adapters}, base, base_params, input_ids, loss_mask, seq_idx=seq_idx,
                         align_weight=align_weight, kl_weight=kl_weight, shared_kv=shared_kv)

    @jax.jit
    def step(adapters, opt_state, frozen, base_params, input_ids, loss_mask, seq_idx=None):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters, frozen, base_params, input_ids,
                                                                       loss_mask, seq_idx)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, metrics

    return step


# ---- early exit -------------------------------------------------------------------------------------------

def exit_logits(model: DecoderLM, params, input_ids, n_exits: int, **kwargs):
    """(n_exits, b, l, V) float32 logits of `model`'s stream cut after 1, ..., n_exits layers, each read
    through the shared final norm and head (same rate and adapters as `model`); `kwargs` (seq_idx, mask,
    shared_kv_states) go to every call."""
    out = []
    for k in range(1, n_exits + 1):
        cut = type(model)(truncated_config(model.config, k), residual_rate=model.residual_rate,
                          adapter_rank=model.adapter_rank)
        keep = {name: v for name, v in params.items()
                if not (name.startswith(("layers_", "adapters_")) and int(name.split("_")[1]) >= k)}
        out.append(cut.apply({"params": keep}, input_ids, **kwargs))
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


def early_exit_quality(exit_logits_, full_logits, targets, first, mask=None):
    """(agreement with the full model's greedy token, mean NLL of `targets`) of the predictions the tokens
    exit with. exit_logits_: (K, b, l, V); full_logits, targets: (b, l, V), (b, l); first: (b, l) from
    `early_exit_point` (K: the full model's logits); mask (b, l): the tokens averaged over (default all)."""
    logits = jnp.concatenate([exit_logits_, full_logits[None]], 0)
    chosen = jnp.take_along_axis(logits, first[None, ..., None], axis=0)[0]            # (b, l, V)
    return prediction_quality(chosen, full_logits, targets, mask)


def prediction_quality(logits, full_logits, targets, mask=None):
    """(agreement of argmax `logits` with argmax `full_logits`, mean NLL of `targets` under `logits`) over
    the tokens of mask (b, l) (default all). logits, full_logits: (b, l, V); targets: (b, l)."""
    w = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    total = jnp.maximum(w.sum(), 1.0)
    agree = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(full_logits, -1)) * w) / total
    nll = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0] * w) / total
    return float(agree), float(nll)


def skip_decoding_layer_mask(seq_len: int, n_layer: int, *, max_layers: int, min_layers: int,
                             warmup_layers: int = 1) -> Tuple[jax.Array, float]:
    """SkipDecode's schedule (Del Corro et al. 2023, arXiv 2307.02628): ((seq_len, n_layer) bool, mean layers).

    Position t runs L(t) = round(max_layers − (max_layers − min_layers) · t / (seq_len − 1)) layers — non-
    increasing in t, so a layer skipped at t is skipped at every later position and no query reads a key a
    skipping token wrote — namely the first `warmup_layers` and the top L(t) − warmup_layers; the lower-middle
    layers are bypassed. Feed it to `forward(..., layer_mask=...)` broadcast over the batch.
    """
    if not 0 <= warmup_layers <= min_layers <= max_layers <= n_layer or seq_len < 1:
        raise ValueError("skip_decoding_layer_mask: need seq_len >= 1 and 0 <= warmup_layers <= min_layers <= "
                         f"max_layers <= n_layer; got seq_len={seq_len}, warmup_layers={warmup_layers}, "
                         f"min_layers={min_layers}, max_layers={max_layers}, n_layer={n_layer}")
    t = jnp.arange(seq_len, dtype=jnp.float32) / max(seq_len - 1, 1)
    layers = jnp.round(max_layers - (max_layers - min_layers) * t).astype(jnp.int32)          # (l,)
    index = jnp.arange(n_layer)
    run = (index[None, :] < warmup_layers) | (index[None, :] >= n_layer - (layers[:, None] - warmup_layers))
    return run, float(jnp.mean(layers))


# ---- ahead-of-time expert loading ---------------------------------------------------------------------------

def layer_router(params, layer: int) -> Tuple[jax.Array, jax.Array]:
    """(pre-norm scale (d,), router kernel (d, E)) of MoE layer `layer` ("E" in the pattern) of `params`."""
    block = params[f"layers_{layer}"]
    try:
        return block["norm"]["weight"], block["mixer"]["moe"]["router"]["kernel"]
    except KeyError:
        raise ValueError(f"layer_router: layers_{layer} is not an MoE ('E') layer: it has {sorted(block)} / "
                         f"{sorted(block.get('mixer', {}))}") from None


def route_top_k(residual, norm_scale, router_kernel, k: int, eps: float = 1e-5):
    """(..., k) int32: the top-k experts of an MoE layer (pre-norm `norm_scale` (d,), router (d, E)) for the
    residual (..., d) entering it — the layer's own routing (RMSNorm, float32 logits; top-k of the softmax is
    top-k of the logits)."""
    from mamba_jax.ops.norms import rms_norm

    x = rms_norm(residual.astype(jnp.float32), norm_scale.astype(jnp.float32), eps)
    return jax.lax.top_k(x @ router_kernel.astype(jnp.float32), k)[1]


def expert_hit_rate(predicted, actual, mask=None):
    """Share of the experts actually used that were predicted: mean over tokens of |predicted ∩ actual| / k.
    predicted: (..., m) ids (m ≥ 1 prefetched), actual: (..., k); mask (...) selects tokens (default all)."""
    hits = jnp.any(predicted[..., :, None] == actual[..., None, :], axis=-2).mean(-1)
    if mask is None:
        return float(jnp.mean(hits))
    mask = jnp.asarray(mask, jnp.float32)
    return float(jnp.sum(hits * mask) / jnp.maximum(mask.sum(), 1))


def expert_prediction_hit_rates(base: DecoderLM, base_params, fast: Optional[DecoderLM], fast_params, input_ids,
                                mask=None, *, k: Optional[int] = None,
                                shared_kv: bool = False) -> Dict[str, Dict[int, float]]:
    """Hit rates of predicting MoE layer j's experts ahead, per distance j − i.

    The experts actually used at layer j are its routing of the slow residual h_j entering it. A prediction
    made after i < j layers applies layer j's router to the residual known then: the slow stream's own h_i
    ("slow") or — for i ≤ n_fast — the fast stream's g_i ("fast", M2R2: g_i is meant to be ahead of h_i).
    Returns {"slow": {d: rate}, "fast": {d: rate}}, each the mean over the (j, i) pairs at distance d and
    over tokens; k defaults to each layer's routing k; shared_kv: the fast stream reads the slow stream's
    keys and values (as it was trained).
    """
    kinds = base.config.layer_kinds
    slow = base.apply({"params": base_params}, input_ids, mask=mask, return_hidden_states=True,
                      method="forward").hidden_states
    fast_h = () if fast is None else fast.apply({"params": fast_params}, input_ids, mask=mask,
                                                return_hidden_states=True, method="forward",
                                                shared_kv_states=slow if shared_kv else None).hidden_states
    rates: Dict[str, Dict[int, list]] = {"slow": {}, "fast": {}}
    for j, kind in enumerate(kinds):
        if kind != "E":
            continue
        top = k or base.config.mixer_config(kind).moe.top_k
        scale, router = layer_router(base_params, j)
        eps = base.config.mixer_config(kind).rms_norm_eps
        actual = route_top_k(slow[j], scale, router, top, eps)
        for i in range(j):
            for name, stream in (("slow", slow), ("fast", fast_h)):
                if i < len(stream) and (name == "slow" or i >= 1):   # g_0 = h_0: the same prediction
                    rate = expert_hit_rate(route_top_k(stream[i], scale, router, top, eps), actual, mask)
                    rates[name].setdefault(j - i, []).append(rate)
    return {name: {d: sum(v) / len(v) for d, v in sorted(per.items())} for name, per in rates.items()}


def offload_decode_latency(*, n_layers: int, n_moe_layers: int, layer_s: float, experts_needed: float,
                           expert_bytes: float, host_bandwidth: float, hit_rate: float = 0.0,
                           prefetch_distance: int = 0) -> float:
    """Seconds per decode step of a model whose MoE experts live in host memory (a cost model).

    Every layer computes for `layer_s` (dense weights from HBM; the experts' own compute is inside). Each MoE
    layer needs `experts_needed` experts of `expert_bytes`, moved over the host link at `host_bandwidth`
    (bytes/s): T = experts_needed · expert_bytes / host_bandwidth per layer.
    - On demand (prefetch_distance 0): the layer waits for its transfer: n_layers · layer_s + n_moe · T.
    - Ahead of time: the predicted experts' transfer starts `prefetch_distance` layers earlier and overlaps
      that compute; the share 1 − hit_rate of the needed experts was mispredicted and is loaded on demand.
      Per MoE layer the wait is max(0, T − d · layer_s) + (1 − hit_rate) · T; and the link cannot move more
      than it can: the step takes at least n_moe · (2 − hit_rate) · T (prefetched and missed bytes).
    """
    transfer = experts_needed * expert_bytes / host_bandwidth
    compute = n_layers * layer_s
    if prefetch_distance <= 0:
        return compute + n_moe_layers * transfer
    wait = max(0.0, transfer - prefetch_distance * layer_s) + (1.0 - hit_rate) * transfer
    return max(compute + n_moe_layers * wait, n_moe_layers * (2.0 - hit_rate) * transfer)
