"""Masked cross-entropy and metrics against numpy; training lowers the loss on a tiny problem; gradient
accumulation equals one big batch; bf16 compute keeps float32 params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.data import SelectiveCopyTask, make_dataset
from mamba_jax.models import MambaConfig, MambaLM, init_params
from mamba_jax.train import (
    OptimizerConfig,
    accumulated_grads,
    create_train_state,
    evaluate,
    make_eval_step,
    make_optimizer,
    make_train_step,
    masked_cross_entropy,
    split_micro_batches,
)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_cross_entropy_matches_numpy_and_ignores_unmasked_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
    mask = np.zeros((3, 5), bool)
    mask[0, 1:3] = mask[2, 4] = True
    logits[0, 1, targets[0, 1]] += 10.0            # make one answer right...
    logits[0, 2, (targets[0, 2] + 1) % 7] += 10.0  # ... and one wrong
    logits[2, 4, targets[2, 4]] += 10.0
    loss, metrics = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), nll[mask].mean(), rtol=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(2 / 3)
    # sequence 1 has no answers (vacuously right), sequence 0 has a wrong one, sequence 2 is right
    assert float(metrics["exact_match"]) == pytest.approx(2 / 3)
    # changing logits where the mask is False changes nothing
    noisy = logits + 50.0 * rng.normal(size=logits.shape).astype(np.float32) * (~mask)[..., None]
    loss2, _ = masked_cross_entropy(jnp.asarray(noisy), jnp.asarray(targets), jnp.asarray(mask))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_evaluate_pools_over_batches():
    def eval_step(params, batch):
        del params
        return {"nll_sum": batch["n"] * 2.0, "correct": batch["c"], "tokens": batch["n"],
                "exact": batch["e"], "sequences": jnp.asarray(4.0)}
    batches = [{"n": jnp.asarray(10.0), "c": jnp.asarray(5.0), "e": jnp.asarray(1.0)},
               {"n": jnp.asarray(30.0), "c": jnp.asarray(25.0), "e": jnp.asarray(3.0)}]
    out = evaluate(eval_step, None, batches)
    assert out == {"eval_loss": 2.0, "eval_accuracy": 30 / 40, "eval_exact_match": 4 / 8, "eval_tokens": 40.0}
    with pytest.raises(ValueError, match="batches"):
        evaluate(eval_step, None, [])


def test_training_lowers_the_loss_on_a_tiny_problem():
    task = SelectiveCopyTask(seq_len=12, n_tokens_to_copy=2, n_data_tokens=3)
    model = MambaLM(MambaConfig(vocab_size=task.vocab_size, d_model=16, n_layer=1, d_state=4))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=40, weight_decay=0.0))
    state = create_train_state(model.apply, init_params(model, jax.random.PRNGKey(0)), tx)
    batch = make_dataset(task, seed=0, batch_size=16, num_batches=1)[0]
    eval_step = make_eval_step(model.apply)
    before = evaluate(eval_step, state.params, [batch])
    train_step = make_train_step()
    losses = []
    for _ in range(40):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    after = evaluate(eval_step, state.params, [batch])
    assert int(state.step) == 40
    assert losses[0] == pytest.approx(before["eval_loss"], rel=1e-5)   # step metrics are pre-update
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] > before["eval_accuracy"]


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def copy_setup():
    task = SelectiveCopyTask(seq_len=16, n_tokens_to_copy=3, n_data_tokens=4)
    model = MambaLM(MambaConfig(vocab_size=task.vocab_size, d_model=16, n_layer=1, d_state=4))
    batch = dict(make_dataset(task, seed=0, batch_size=8, num_batches=1)[0])
    return task, model, init_params(model, jax.random.PRNGKey(0)), batch


def test_gradient_accumulation_gives_the_one_batch_update(copy_setup):
    """k micro-batches of b/k give the update of one batch of b. Micro-batches hold different numbers of
    answer tokens (some answers masked out), so weighting each micro-batch's *mean* loss equally would
    differ (checked below): the loss is a mean over all answer tokens of the batch. grad_norm is compared
    too, because Adam's update alone would hide a wrong gradient scale."""
    _, model, params, batch = copy_setup
    mask = np.asarray(batch["loss_mask"]).copy()
    mask[:2] = False                                 # micro-batch 0 of 4: no answers at all
    mask[2, np.flatnonzero(mask[2])[:2]] = False     # micro-batch 1: fewer answers
    batch = dict(batch, loss_mask=jnp.asarray(mask))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))

    def run(k):
        state = create_train_state(model.apply, params, tx)
        step = make_train_step(donate=False, grad_accum_steps=k)
        history = []
        for _ in range(2):
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
        return state, history

    (one, one_metrics), (acc, acc_metrics) = run(1), run(4)
    assert int(acc.step) == 2                        # one optimizer step per train step
    np.testing.assert_allclose(_flat(acc.params), _flat(one.params), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_flat(acc.opt_state), _flat(one.opt_state), rtol=1e-4, atol=1e-8)
    for m_one, m_acc in zip(one_metrics, acc_metrics):
        for name in ("loss", "accuracy", "exact_match", "grad_norm"):
            assert float(m_acc[name]) == pytest.approx(float(m_one[name]), rel=1e-5), name
    # the batch discriminates: the equal-weight mean of the micro-batches' mean losses is not the loss
    eval_step = make_eval_step(model.apply)
    micro = [jax.device_get(eval_step(params, jax.tree_util.tree_map(lambda x: x[j], mbs)))
             for mbs in [split_micro_batches(batch, 4)] for j in range(4)]
    assert sorted(m["tokens"] for m in micro) == [0.0, 4.0, 6.0, 6.0]
    naive = np.mean([m["nll_sum"] / m["tokens"] for m in micro if m["tokens"]])
    pooled = sum(m["nll_sum"] for m in micro) / sum(m["tokens"] for m in micro)
    assert float(one_metrics[0]["loss"]) == pytest.approx(pooled, rel=1e-5)
    assert abs(naive - pooled) > 1e-3 * pooled


def test_grad_accum_steps_must_divide_the_batch(copy_setup):
    _, model, params, batch = copy_setup
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(grad_accum_steps=0)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        split_micro_batches(batch, 3)                # 8 sequences
    step = make_train_step(donate=False, grad_accum_steps=3)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
    with pytest.raises(ValueError, match="grad_accum_steps"):
        step(create_train_state(model.apply, params, tx), batch)


def test_bfloat16_compute_keeps_float32_params_and_a_close_loss(copy_setup):
    """compute dtype bf16, param dtype f32: params, grads and Adam state stay float32; the forward really
    runs in bf16 (the jaxpr holds bf16 ops and the loss is not bitwise the float32 one).

    Tolerances: bf16 keeps 8 significant bits, so one rounding has relative error <= u = 2^-8 ≈ 3.9e-3.
    The loss (float32 cross-entropy of float32-cast logits) is a smooth average over many tokens in which
    the roundings of the layers partly cancel: we allow u relative (measured ≈ 1e-4). The gradient goes
    through the same roundings twice (forward and backward): relative L2 error <= 8u = 2^-5 (measured
    ≈ 2u)."""
    task, model32, params, batch = copy_setup
    model16 = MambaLM(model32.config.replace(dtype="bfloat16", param_dtype="float32"))
    params16 = init_params(model16, jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(_flat(params16), _flat(params))      # same init, only the compute differs
    jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, batch["inputs"]))(params))
    assert "bf16" in jaxpr(model16) and "bf16" not in jaxpr(model32)

    grads = {name: jax.jit(lambda p, b, m=m: accumulated_grads(m.apply, p, b))(params, batch)
             for name, m in (("f32", model32), ("bf16", model16))}
    loss = {name: float(s["nll_sum"] / s["tokens"]) for name, (_, s) in grads.items()}
    u = 2.0 ** -8
    assert loss["bf16"] != loss["f32"]
    assert loss["bf16"] == pytest.approx(loss["f32"], rel=u)
    g32, g16 = _flat(grads["f32"][0]), _flat(grads["bf16"][0])
    assert {x.dtype for x in jax.tree_util.tree_leaves(grads["bf16"][0])} == {jnp.dtype(jnp.float32)}
    assert np.linalg.norm(g16 - g32) <= 8 * u * np.linalg.norm(g32)

    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
    new16, m16 = make_train_step(donate=False)(create_train_state(model16.apply, params, tx), batch)
    for tree in (new16.params, new16.opt_state):
        assert {x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} \
            == {jnp.dtype(jnp.float32)}
    assert m16["loss"].dtype == jnp.float32 and float(m16["loss"]) == pytest.approx(loss["bf16"], rel=1e-6)
