"""Masked cross-entropy and metrics against numpy; training lowers the loss on a tiny problem."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.data import SelectiveCopyTask, make_dataset
from mamba_jax.models import MambaConfig, MambaLM, init_params
from mamba_jax.train import (
    OptimizerConfig,
    create_train_state,
    evaluate,
    make_eval_step,
    make_optimizer,
    make_train_step,
    masked_cross_entropy,
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
