"""Layer probes and gradient-descent iterations (experiments/icl/probe.py) against closed forms:
one GD step of size 1 is the averaging estimator, many converge to least squares, an explicit loop, and an
affine probe that recovers a known affine map."""
import jax
import numpy as np
import pytest

from experiments.icl import baselines as bl
from experiments.icl import probe
from mamba_jax.data import function_classes as fc
from mamba_jax.models import MambaConfig
from mamba_jax.models.icl import InContextRegressor


def _linear_f64(seed, b, n, d):
    kf, kx = jax.random.split(jax.random.PRNGKey(seed))
    w = np.asarray(fc.sample_functions(kf, "linear_regression", b, d)["w"], np.float64)
    xs = np.asarray(fc.sample_xs(kx, "linear_regression", b, n, d), np.float64)
    return xs, np.einsum("bnd,bd->bn", xs, w)


def test_gd_zero_steps_predicts_zero_and_one_unit_step_is_averaging():
    xs, ys = _linear_f64(0, 16, 10, 4)
    preds = probe.gradient_descent_predictions(xs, ys, num_steps=1, step_size=1.0)
    assert preds.shape == (2, 16, 10)
    np.testing.assert_array_equal(preds[0], 0.0)
    np.testing.assert_allclose(preds[1], bl.averaging(xs, ys), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("relative", [False, True])
def test_gd_matches_an_explicit_loop(relative):
    xs, ys = _linear_f64(1, 3, 7, 3)
    eta, steps = 0.3, 5
    preds = probe.gradient_descent_predictions(xs, ys, steps, eta, relative=relative)
    for bi in range(3):
        for i in range(7):
            gram = sum((np.outer(xs[bi, j], xs[bi, j]) for j in range(i)), np.zeros((3, 3))) / max(i, 1)
            step = eta / np.linalg.norm(gram, 2) if relative and i > 0 else eta
            w = np.zeros(3)
            for t in range(1, steps + 1):
                grad = np.zeros(3)
                for j in range(i):
                    grad += xs[bi, j] * (xs[bi, j] @ w - ys[bi, j])
                w = w - step * grad / max(i, 1)
                np.testing.assert_allclose(preds[t, bi, i], xs[bi, i] @ w, rtol=1e-10, atol=1e-12)


def test_gd_converges_to_least_squares_once_overdetermined():
    d, n = 4, 20
    xs, ys = _linear_f64(2, 32, n, d)
    preds = probe.gradient_descent_predictions(xs, ys, num_steps=400, step_size=1.0, relative=True)
    late = slice(3 * d, n)  # well-conditioned: i >= 3d examples
    np.testing.assert_allclose(preds[-1][:, late], bl.least_squares(xs, ys)[:, late], atol=1e-6)
    err = bl.squared_error(preds[-1], ys, "linear_regression", d)
    assert np.all(err[late] < 1e-10)
    # and the error falls along the iterations
    errs = [bl.squared_error(p, ys, "linear_regression", d)[late].mean() for p in preds[::50]]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_gd_errors_picks_a_converging_step_size_and_scores_divergence_as_inf():
    xs, ys = _linear_f64(3, 64, 12, 4)
    out = probe.gradient_descent_errors(xs, ys, "linear_regression", 4, num_steps=6, step_sizes=(0.05, 1.0, 2.5))
    assert out["step_size"] == 1.0
    assert out["errors"].shape == (7, 12) and np.all(np.isfinite(out["errors"]))
    np.testing.assert_allclose(out["errors"][0], 1.0 * np.mean(ys ** 2, axis=0) / 4, rtol=1e-10)


def test_affine_probe_recovers_a_known_map_and_handles_constant_layers():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(50, 8))
    preds = np.stack([(targets - 3.0) / 2.0, np.full_like(targets, 7.0), targets])
    slope, intercept = probe.fit_affine_probe(preds, targets)
    np.testing.assert_allclose(slope, [2.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(intercept[[0, 2]], [3.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(intercept[1], targets[:, 1:].mean(), atol=1e-12)
    errors = probe.probe_errors(preds, targets, preds, targets, "linear_regression", 1)
    np.testing.assert_allclose(errors[[0, 2], 1:], 0.0, atol=1e-20)
    assert np.all(errors[1, 1:] > 0.5)
    with pytest.raises(ValueError, match="preds"):
        probe.fit_affine_probe(preds[0], targets)


def test_layer_predictions_rows_and_last_row_is_the_output():
    model = InContextRegressor(MambaConfig(vocab_size=1, d_model=16, n_layer=3))
    xs, ys = fc.sample_prompts(jax.random.PRNGKey(0), "linear_regression", 2, 5, 3)
    params = model.init(jax.random.PRNGKey(1), xs, ys)["params"]
    layers = probe.layer_predictions(model, params, xs, ys)
    assert layers.shape == (4, 2, 5) and layers.dtype == np.float64
    np.testing.assert_allclose(layers[-1], np.asarray(model.apply({"params": params}, xs, ys)), rtol=1e-6,
                               atol=1e-6)
    assert not np.allclose(layers[0], layers[-1])
