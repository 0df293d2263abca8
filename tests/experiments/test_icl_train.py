"""ICL training pieces: the curriculum, the loss, the evaluation, and that training learns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.icl.train import (Curriculum, icl_loss, learning_rate_schedule, model_errors, paper_curricula,
                                  seed_state, train, train_seeds)
from mamba_jax.data.function_classes import sample_prompts
from mamba_jax.models import MambaConfig
from mamba_jax.models.icl import InContextRegressor


def test_paper_curricula():
    dims, points = paper_curricula("linear_regression", d=20)
    assert [dims.value(s) for s in (0, 1999, 2000, 30000, 10 ** 6)] == [5, 5, 6, 20, 20]
    assert [points.value(s) for s in (0, 2000, 4000, 30000, 10 ** 6)] == [11, 13, 15, 41, 41]
    _, points = paper_curricula("relu_2nn", d=20)
    assert [points.value(s) for s in (0, 2000, 30000, 10 ** 6)] == [26, 31, 101, 101]
    with pytest.raises(ValueError, match="Curriculum"):
        Curriculum(5, 4, 1, 10)


def test_learning_rate_schedules():
    constant = learning_rate_schedule(1e-3, "constant", 1000)
    assert float(constant(0)) == float(constant(999)) == pytest.approx(1e-3)
    cosine = learning_rate_schedule(1e-3, "cosine", 1000)
    assert float(cosine(0)) == 0.0
    assert float(cosine(50)) == pytest.approx(1e-3)  # warm-up: 5 % of the steps
    assert float(cosine(525)) == pytest.approx(0.5 * (1e-3 + 1e-5), rel=1e-3)  # half-way through the decay
    assert float(cosine(1000)) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(1e-3, "linear", 10)


def test_loss_and_errors_against_numpy():
    preds, ys = jnp.array([[1.0, 2.0], [0.0, -1.0]]), jnp.array([[0.0, 2.0], [2.0, 1.0]])
    assert float(icl_loss(preds, ys)) == pytest.approx(np.mean([1, 0, 4, 4]))
    model = InContextRegressor(MambaConfig(d_model=16, n_layer=1, d_state=4))
    xs, ys = sample_prompts(jax.random.PRNGKey(0), "linear_regression", 3, 5, 4)
    params = model.init(jax.random.PRNGKey(1), xs, ys)["params"]
    errors = model_errors(model, params, xs, ys, "linear_regression", 4)
    preds = np.asarray(model.apply({"params": params}, xs, ys))
    np.testing.assert_allclose(errors, ((preds - np.asarray(ys)) ** 2).mean(0) / 4, rtol=1e-6)


def test_training_learns_linear_regression_in_context(optimized_xla):
    """A tiny Mamba trained briefly on d = 4 linear regression beats predicting 0 — and the averaging
    estimator, whose error at position i is (d + 1) / i in closed form (≈ 0.53 over i = 8..11) — at
    late positions, where only the in-context examples can tell it the weights (a run here gave 0.35)."""
    d, n = 4, 12
    model = InContextRegressor(MambaConfig(d_model=32, n_layer=2, d_state=8))
    state, history = train(model, task="linear_regression", d=d, num_steps=400, batch_size=32,
                           dims=Curriculum(d, d, 0, 1), points=Curriculum(n, n, 0, 1), learning_rate=3e-3,
                           log_every=100, progress=False)
    assert [h["step"] for h in history] == [100, 200, 300, 400]
    xs, ys = sample_prompts(jax.random.PRNGKey(123), "linear_regression", 256, n, d)
    errors = model_errors(model, state.params, xs, ys, "linear_regression", d)
    assert errors[0] > 0.8  # the first prediction has no examples: nothing to learn from
    averaging = np.mean([(d + 1) / i for i in range(8, 12)])
    assert errors[-4:].mean() < min(0.45, averaging), errors


def test_each_seed_of_a_vmapped_run_is_the_lone_run_of_that_seed():
    """`train_seeds` trains all seeds in one vmapped step; seed 1 of (0, 1) must be `train(seed=1)` — the
    same initialisation and the same prompts — and seed 0 must differ from it."""
    model = InContextRegressor(MambaConfig(d_model=16, n_layer=1, d_state=4))
    kw = dict(task="linear_regression", d=3, num_steps=12, batch_size=4, dims=Curriculum(2, 3, 1, 6),
              points=Curriculum(4, 6, 2, 6), learning_rate=3e-3, log_every=6, progress=False)
    lone, history = train(model, seed=1, **kw)
    both, histories = train_seeds(model, seeds=(0, 1), **kw)
    np.testing.assert_allclose([h["loss"] for h in histories[1]], [h["loss"] for h in history], rtol=1e-5)
    assert [h["points"] for h in history] == [4, 6]
    for a, b in zip(jax.tree_util.tree_leaves(lone.params), jax.tree_util.tree_leaves(seed_state(both, 1).params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(histories[0][0]["loss"], histories[1][0]["loss"])
    with pytest.raises(ValueError, match="`seeds`"):
        train_seeds(model, seeds=(), **kw)
