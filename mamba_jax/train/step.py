"""Train state, masked cross-entropy, the jitted train step and answer-position evaluation."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from mamba_jax.ops._checks import check_token_ids

Batch = Mapping[str, jax.Array]  # inputs/targets (b, l) int32, loss_mask (b, l) bool, optional seq_idx (b, l) int
TrainState = train_state.TrainState
JITTER_RNG = "jitter"   # the rng stream of the MoE router jitter (`mamba_jax.layers.moe.MoE`)


def as_key(rng) -> jax.Array:
    """A PRNG key from an int seed or a key (returned as is). Raises ValueError naming `rng` otherwise."""
    if isinstance(rng, bool):
        raise ValueError(f"`rng` must be an int seed or a jax PRNG key; got {rng!r}")
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    if not hasattr(rng, "dtype"):
        raise ValueError(f"`rng` must be an int seed or a jax PRNG key; got {type(rng).__name__}")
    return rng


def step_rng(rng, step) -> jax.Array:
    """The key of optimizer step `step` (int or int32 scalar array): ``fold_in(rng, step)`` — a fresh key per
    step, a function of the seed and the step only (so a resumed run draws the same keys)."""
    return jax.random.fold_in(as_key(rng), step)


def forward(apply_fn: Callable, params, batch: Batch) -> jax.Array:
    """The logits (b, l, v) of ``batch["inputs"]``; with a ``seq_idx`` (b, l) int entry (packed documents,
    e.g. `mamba_jax.data.text`) it is passed to the model, whose scan and conv states then reset wherever
    seq_idx changes, so packed documents do not see each other. (Whether the key is present is static
    under jit: a batch with it and one without compile separately.)"""
    if "seq_idx" in batch:
        return apply_fn({"params": params}, batch["inputs"], seq_idx=batch["seq_idx"])
    return apply_fn({"params": params}, batch["inputs"])


def forward_train(apply_fn: Callable, params, batch: Batch, rng: Optional[jax.Array] = None):
    """(logits, router_loss, moe_metrics) of a training forward: as `forward`, in train mode
    (``deterministic=False``: MoE train capacity and jitter), with the losses the model sows collected
    (``mutable=["losses", "moe_metrics"]``).
    rng: optional PRNG key, given to the model as its ``"jitter"`` rng stream (MoE router jitter,
    `MoEConfig.jitter`); None passes no rngs (a model with jitter > 0 then fails asking for it).

    router_loss: the sum of every sown ``losses`` value (MoE load-balancing + z losses, already weighted
    by their coefficients), or None when the model sows none. moe_metrics: the mean over layers of each
    sown ``moe_metrics`` entry (e.g. ``moe_dropped_fraction``), and each layer's dropped fraction
    (``moe_dropped_fraction_<layer>``, e.g. ``moe_dropped_fraction_layers_1``); {} without MoE layers.
    """
    kwargs = {"seq_idx": batch["seq_idx"]} if "seq_idx" in batch else {}
    if rng is not None:
        kwargs["rngs"] = {JITTER_RNG: rng}
    logits, sown = apply_fn({"params": params}, batch["inputs"], mutable=["losses", "moe_metrics"],
                            deterministic=False, **kwargs)
    losses = jax.tree_util.tree_leaves(sown.get("losses", {}))
    router_loss = sum(losses[1:], losses[0]) if losses else None
    by_name: Dict[str, list] = {}
    per_layer: Dict[str, jax.Array] = {}
    for path, value in jax.tree_util.tree_leaves_with_path(sown.get("moe_metrics", {})):
        keys = [p.key for p in path if isinstance(getattr(p, "key", None), str)]
        by_name.setdefault(keys[-1], []).append(value)
        if keys[-1] == "dropped_fraction":
            per_layer[f"moe_dropped_fraction_{keys[0]}"] = value
    moe_metrics = {f"moe_{k}": sum(v) / len(v) for k, v in by_name.items()}
    moe_metrics.update(per_layer)
    return logits, router_loss, moe_metrics


def create_train_state(apply_fn: Callable, params, tx: optax.GradientTransformation) -> TrainState:
    """A flax TrainState: step (int32 scalar array), params, opt_state; apply_fn and tx are static fields.

    The step starts as an int32 array (not a Python int) so that the first jitted step, later steps and
    a restored state all trace the same way.
    """
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx)
    return state.replace(step=jnp.zeros((), jnp.int32))


def masked_mean(per_token: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Mean of `per_token` (...) over the tokens where `mask` (...) is nonzero; 0 when none is.

    Masked tokens are removed with `where`, so a NaN/inf there changes neither the value nor the gradient.
    """
    if mask is None:
        return jnp.mean(per_token)
    keep = jnp.asarray(mask) != 0
    count = jnp.sum(keep).astype(per_token.dtype)
    total = jnp.sum(jnp.where(keep, per_token, jnp.zeros((), per_token.dtype)))
    return total / jnp.maximum(count, 1)


def masked_token_stats(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> Dict[str, jax.Array]:
    """Sums over the masked (answer) positions.

    Args:
      logits: (b, l, v) float; targets: (b, l) int; loss_mask: (b, l) bool (or 0/1).
    Returns float32 scalars: ``nll_sum`` (summed cross-entropy), ``correct`` (argmax == target),
    ``tokens`` (masked positions), ``exact`` (sequences whose answer positions are all correct) and
    ``sequences`` (b).

    The mask selects (`where`): a target outside [0, v) or a NaN/inf logit at a position the mask leaves out
    changes nothing (a masked target is replaced before the cross-entropy, so it cannot reach the loss or
    its gradient). At a masked-in position, a target outside the vocabulary gives NaN: a loud failure,
    which `train_loop` turns into an error naming the step.
    """
    keep = jnp.asarray(loss_mask) != 0
    safe_targets = jnp.where(keep, targets, 0)
    logits = jnp.where(keep[..., None], logits.astype(jnp.float32), 0.0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
    nll = jnp.where((safe_targets >= 0) & (safe_targets < logits.shape[-1]), nll, jnp.nan)
    hit = (jnp.argmax(logits, axis=-1) == safe_targets) & keep
    all_hit = jnp.all(hit | ~keep, axis=-1)
    return {"nll_sum": jnp.sum(jnp.where(keep, nll, 0.0)), "correct": jnp.sum(hit.astype(jnp.float32)),
            "tokens": jnp.sum(keep.astype(jnp.float32)), "exact": jnp.sum(all_hit.astype(jnp.float32)),
            "sequences": jnp.asarray(targets.shape[0], jnp.float32)}


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Mean cross-entropy over the masked positions, and metrics.

    Args: logits (b, l, v), targets (b, l) int, loss_mask (b, l) bool.
    Returns ``(loss, metrics)``: loss a float32 scalar (0 when nothing is masked); metrics holds
    ``loss``, ``accuracy`` (argmax accuracy on masked positions) and ``exact_match`` (fraction of
    sequences with every masked position right).
    """
    s = masked_token_stats(logits, targets, loss_mask)
    tokens = jnp.maximum(s["tokens"], 1.0)
    loss = s["nll_sum"] / tokens
    return loss, {"loss": loss, "accuracy": s["correct"] / tokens, "exact_match": s["exact"] / s["sequences"]}


def split_micro_batches(batch: Batch, grad_accum_steps: int) -> Batch:
    """Every (b, ...) array of `batch` as (k, b/k, ...): micro-batch j is rows j·b/k ... (j+1)·b/k - 1.

    Raises ValueError (naming `grad_accum_steps`) unless k is a positive int dividing the batch size.
    """
    k = grad_accum_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`grad_accum_steps` must be a positive int; got {k!r}")
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % k:
        raise ValueError(f"`grad_accum_steps` ({k}) must divide the batch size; got batch leading dims {sorted(sizes)}")
    return jax.tree_util.tree_map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def accumulated_grads(apply_fn: Callable, params, batch: Batch, grad_accum_steps: int = 1,
                      rng: Optional[jax.Array] = None):
    """Gradient of the batch's mean answer-token cross-entropy, summed over `grad_accum_steps`
    micro-batches (a `lax.scan`, so only one micro-batch's activations are alive at a time).

    Each micro-batch contributes ``nll_sum_j / tokens``, where `tokens` counts the masked positions of the
    whole batch (known from `loss_mask` before any forward pass): every answer token has the same weight
    whatever micro-batch it is in, so the result equals the one-batch gradient up to float summation
    order, even when micro-batches hold different numbers of answer tokens.
    Returns ``(grads, stats)``: grads with the structure of `params` (accumulated in float32 when k > 1),
    stats the `masked_token_stats` summed over the micro-batches.
    rng: optional PRNG key for the model's "jitter" stream (`forward_train`); micro-batch j gets
    ``fold_in(rng, j)``. None: no rngs.
    """
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def micro(params, mb, j):
        key = None if rng is None else jax.random.fold_in(rng, j)

        def loss_fn(p):
            logits, router_loss, moe_metrics = forward_train(apply_fn, p, mb, key)
            stats = masked_token_stats(logits, mb["targets"], mb["loss_mask"])
            loss = stats["nll_sum"] / tokens
            if router_loss is not None:   # MoE layers: their balancing losses join the objective
                loss = loss + router_loss / grad_accum_steps
                stats = dict(stats, router_loss=router_loss / grad_accum_steps,
                             **{k: v / grad_accum_steps for k, v in moe_metrics.items()})
            return loss, stats
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, stats

    if grad_accum_steps == 1:
        return micro(params, batch, 0)
    micro_batches = split_micro_batches(batch, grad_accum_steps)
    index = jnp.arange(grad_accum_steps, dtype=jnp.int32)

    def body(carry, mb_j):
        mb, j = mb_j
        return jax.tree_util.tree_map(lambda acc, x: acc + x.astype(acc.dtype), carry, micro(params, mb, j)), None

    # float32 accumulators (also for lower-precision params), one per gradient leaf and stat
    shapes = jax.eval_shape(micro, params, jax.tree_util.tree_map(lambda x: x[0], micro_batches), index[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)
    (grads, stats), _ = jax.lax.scan(body, zeros, (micro_batches, index))
    return grads, stats


def make_train_step(learning_rate_fn: Optional[Callable] = None, *, donate: bool = True, grad_accum_steps: int = 1,
                    rng=None):
    """A jitted ``train_step(state, batch) -> (state, metrics)``: one optimizer step per call.

    `batch`: inputs/targets (b, l) int32, loss_mask (b, l) bool and, for packed documents, seq_idx (b, l)
    int32 (passed to the model, see `forward`; split into micro-batches like the rest). With
    ``grad_accum_steps = k`` the batch is processed as k micro-batches of b/k sequences in a `lax.scan`
    inside the step and their gradients are summed, weighted by answer tokens (`accumulated_grads`),
    before the one optimizer update: the same update as the whole batch at once, with the activation
    memory of b/k. (Chosen over `optax.MultiSteps` so that a train step, the schedule, `state.step`, the
    logs and the checkpoints stay in optimizer steps.) Mixed precision comes from the model: build it
    with ``dtype="bfloat16"`` and ``param_dtype="float32"``; params, gradients and optimizer state stay
    float32 and the loss is computed in float32 from float32 logits.

    metrics (float32 scalars, pooled over the whole batch): loss, accuracy, exact_match, grad_norm
    (before clipping) and, when `learning_rate_fn` is given, the learning rate used at this step. With
    `donate` the input state's buffers are reused (do not touch the old state afterwards).

    rng: None (default: the model gets no rngs, as before) or an int seed / PRNG key for the model's
    random training-time noise — the MoE router jitter (`MoEConfig.jitter`, rng stream "jitter"). Step
    ``state.step`` uses ``step_rng(rng, state.step)`` (a fresh key per step, deterministic given the seed
    and the same after a resume); evaluation (`make_eval_step`) never jitters.
    """
    if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"make_train_step: `grad_accum_steps` must be a positive int; got {grad_accum_steps!r}")
    try:
        base_key = None if rng is None else as_key(rng)
    except ValueError as error:
        raise ValueError(f"make_train_step: {error}") from None

    def train_step(state: TrainState, batch: Batch):
        key = None if base_key is None else jax.random.fold_in(base_key, state.step)
        grads, s = accumulated_grads(state.apply_fn, state.params, batch, grad_accum_steps, key)
        tokens = jnp.maximum(s["tokens"], 1.0)
        loss = s["nll_sum"] / tokens
        metrics = {"loss": loss, "accuracy": s["correct"] / tokens, "exact_match": s["exact"] / s["sequences"],
                   "grad_norm": optax.tree.norm(grads)}
        # MoE models: the router loss (already in the objective; `loss` stays the token cross-entropy)
        # and the mean over micro-batches of the MoE metrics
        metrics.update({k: v for k, v in s.items() if k == "router_loss" or k.startswith("moe_")})
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return state.apply_gradients(grads=grads), metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def check_batch_ids(fn: str, batch: Batch, vocab_size: Optional[int]) -> None:
    """Concrete (host) batches: every ``inputs`` id, and every ``targets`` id the ``loss_mask`` keeps, lies in
    [0, vocab_size) — else ValueError naming the id, its position and vocab_size. Traced batches pass."""
    if vocab_size is None:
        return
    check_token_ids(fn, "batch['inputs']", batch["inputs"], vocab_size)
    if "targets" in batch:
        check_token_ids(fn, "batch['targets']", batch["targets"], vocab_size, batch.get("loss_mask"))


def model_vocab_size(apply_fn: Callable) -> Optional[int]:
    """The vocabulary of a bound ``model.apply`` (None when it is not a language model's)."""
    return getattr(getattr(getattr(apply_fn, "__self__", None), "config", None), "vocab_size", None)


def make_eval_step(apply_fn: Callable):
    """A ``eval_step(params, batch) -> dict`` of summed answer-position stats (`masked_token_stats`), jitted;
    a batch's ``seq_idx``, when present, goes to the model (`forward`). Called with host (concrete) arrays it
    first checks the ids against the model's vocabulary (`check_batch_ids`)."""

    def eval_step(params, batch: Batch):
        logits = forward(apply_fn, params, batch)
        return masked_token_stats(logits, batch["targets"], batch["loss_mask"])

    jitted = jax.jit(eval_step)
    vocab_size = model_vocab_size(apply_fn)

    def checked_eval_step(params, batch: Batch):
        check_batch_ids("eval_step", batch, vocab_size)
        return jitted(params, batch)

    return checked_eval_step


def evaluate(eval_step: Callable, params, batches: Iterable[Batch]) -> Dict[str, float]:
    """Answer-position metrics over all `batches`, pooled (not averaged per batch).

    Returns floats: ``eval_loss`` (mean cross-entropy per answer token), ``eval_accuracy`` (fraction of
    answer tokens right), ``eval_exact_match`` (fraction of sequences with every answer token right) and
    ``eval_tokens`` (answer tokens counted).
    """
    totals: Dict[str, float] = {}
    for batch in batches:
        stats = jax.device_get(eval_step(params, batch))
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + float(np.asarray(value, np.float64))
    if not totals or totals["tokens"] == 0:
        raise ValueError("evaluate: `batches` held no answer positions (empty or all-False loss_mask)")
    return {"eval_loss": totals["nll_sum"] / totals["tokens"],
            "eval_accuracy": totals["correct"] / totals["tokens"],
            "eval_exact_match": totals["exact"] / totals["sequences"],
            "eval_tokens": totals["tokens"]}
