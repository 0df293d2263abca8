"""In-context regression prompts: checked against closed forms and independent numpy implementations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.data.function_classes import (
    TASKS,
    error_scale,
    evaluate,
    sample_functions,
    sample_prompts,
    sample_xs,
    skewed_eigenvalues,
    skewed_transform,
)
from mamba_jax.models.icl import interleave

KEY = jax.random.PRNGKey(0)


def _np(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _within(mean_samples, expected, n_se=5.0, floor=0.0):
    """Monte-Carlo mean of `mean_samples` equals `expected` within n_se standard errors."""
    m = float(np.mean(mean_samples))
    se = float(np.std(mean_samples) / np.sqrt(mean_samples.size))
    assert abs(m - expected) <= n_se * se + floor, (m, expected, se)


# ----------------------------------------------------------------------------- shapes, determinism
@pytest.mark.parametrize("task", TASKS)
def test_shapes_dtypes_determinism(task):
    xs, ys = sample_prompts(KEY, task, 3, 7, 5)
    assert xs.shape == (3, 7, 5) and ys.shape == (3, 7)
    assert xs.dtype == jnp.float32 and ys.dtype == jnp.float32
    assert np.all(np.isfinite(ys))
    xs2, ys2 = sample_prompts(KEY, task, 3, 7, 5)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    xs3, ys3 = sample_prompts(jax.random.PRNGKey(1), task, 3, 7, 5)
    assert not np.allclose(xs, xs3) and not np.allclose(ys, ys3)
    # different prompts in a batch hold different functions
    assert not np.allclose(ys[0], ys[1])


@pytest.mark.parametrize("task", TASKS)
def test_d_active_zeroes_the_other_coordinates(task):
    xs, ys = sample_prompts(KEY, task, 4, 30, 8, d_active=3)
    assert np.all(np.asarray(xs[..., 3:]) == 0)
    assert np.all(np.asarray(xs[..., :3]) != 0)
    params = sample_functions(KEY, task, 4, 8, d_active=3)
    if "w" in params:
        assert np.all(np.asarray(params["w"][:, 3:]) == 0)
    if "coords" in params:
        assert np.asarray(params["coords"]).max() < 3


def test_noise_is_added_with_the_given_std():
    _, clean = sample_prompts(KEY, "linear_regression", 200, 50, 4)
    _, noisy = sample_prompts(KEY, "linear_regression", 200, 50, 4, noise_std=0.5)
    diff = np.asarray(noisy - clean)
    assert abs(diff.std() - 0.5) < 0.02 and abs(diff.mean()) < 0.02


# ----------------------------------------------------------------------------- linear regression
def test_linear_least_squares_recovers_w_exactly_when_n_ge_d():
    d, n = 6, 10
    xs, ys = _np(*sample_prompts(KEY, "linear_regression", 8, n, d))
    params = sample_functions(jax.random.split(KEY, 3)[1], "linear_regression", 8, d)
    for b in range(8):
        w_hat, res, rank, _ = np.linalg.lstsq(xs[b], ys[b], rcond=None)
        assert rank == d
        np.testing.assert_allclose(xs[b] @ w_hat, ys[b], atol=1e-4)  # residual ~ 0: y is linear in x
        np.testing.assert_allclose(w_hat, np.asarray(params["w"][b]), atol=1e-4)


@functools.lru_cache(maxsize=None)
def _linear_sample():
    """One shared big linear-regression sample (20000 prompts, 13 points, d = 10), to compile once."""
    return _np(*sample_prompts(KEY, "linear_regression", 20000, 13, 10))


@pytest.mark.parametrize("n_ctx", [3, 6, 10, 12])
def test_min_norm_least_squares_query_error(n_ctx):
    """Min-norm least squares from n < d points recovers P w (P = projection on the span of the x_i),
    so on an independent query x_q ~ N(0, I): E[(x_q · (w_hat - w))²] = E||(I - P) w||² = d - n
    (= (1 - n/d) d). For n >= d it is exactly 0."""
    xs, ys = (a[:3000] for a in _linear_sample())
    d = xs.shape[-1]
    w_hat = np.einsum("bdn,bn->bd", np.linalg.pinv(xs[:, :n_ctx]), ys[:, :n_ctx])  # min-norm solution
    errs = (np.einsum("bd,bd->b", xs[:, -1], w_hat) - ys[:, -1]) ** 2  # query: the last point
    expected = max(d - n_ctx, 0)
    if expected == 0:  # float32 data: tiny errors, a bit larger for the square (n = d) systems
        assert np.median(errs) < 1e-8 and errs.max() < 1e-3
    else:
        _within(errs, expected)


def _averaging_errors(xs, ys, n):
    """w_hat = (1/n) sum_i y_i x_i from the first n points, squared error on the last point."""
    w_hat = np.einsum("bn,bnd->bd", ys[:, :n], xs[:, :n]) / n
    return (np.einsum("bd,bd->b", xs[:, -1], w_hat) - ys[:, -1]) ** 2


@pytest.mark.parametrize("n", [4, 12])
def test_averaging_estimator_closed_form(n):
    """Averaging estimator w_hat = (1/n) sum_i y_i x_i = A w, A = (1/n) sum_i x_i x_i^T, x ~ N(0, I_d),
    w ~ N(0, I_d), query x_q ~ N(0, I_d) independent:

        E[(x_q · w_hat - x_q · w)²] = E||(A - I) w||² = E tr(A²) - 2 E tr A + d,
        E tr A = d,  E tr(A²) = (1/n²)[n E||x||⁴ + n(n-1) E(x_i · x_j)²] = (d² + 2d)/n + (n-1) d/n,

    hence the error is d (d + 1) / n. Checked both on an independent numpy Monte Carlo (validating the
    formula) and on the sampler's prompts."""
    xs, ys = _linear_sample()
    d = xs.shape[-1]
    expected = d * (d + 1) / n
    rng = np.random.default_rng(0)
    xs_np = rng.standard_normal((20000, n + 1, d))
    w_np = rng.standard_normal((20000, d))
    _within(_averaging_errors(xs_np, np.einsum("bnd,bd->bn", xs_np, w_np), n), expected)
    _within(_averaging_errors(xs, ys, n), expected)


# ----------------------------------------------------------------------------- sparse, skewed
@pytest.mark.parametrize("k,d_active", [(3, None), (1, None), (2, 5), (8, 8)])
def test_sparse_has_exactly_k_nonzeros(k, d_active):
    d = 8
    xs, ys = _np(*sample_prompts(KEY, "sparse_linear_regression", 16, 20, d, d_active=d_active, k=k))
    da = d if d_active is None else d_active
    supports = set()
    for b in range(16):
        w_hat = np.linalg.lstsq(xs[b, :, :da], ys[b], rcond=None)[0]
        np.testing.assert_allclose(xs[b, :, :da] @ w_hat, ys[b], atol=1e-4)
        nz = np.flatnonzero(np.abs(w_hat) > 1e-4)
        assert nz.size == k
        supports.add(tuple(nz))
    if k < da:
        assert len(supports) > 1  # the support is random
    assert error_scale("sparse_linear_regression", d, k) == k


def test_axis_skewed_covariance_spectrum():
    d = 8
    lam = 1.0 / np.arange(1, d + 1)
    lam = lam * d / lam.sum()
    np.testing.assert_allclose(np.asarray(skewed_eigenvalues(d)), lam, rtol=1e-6)
    xs, ys = _np(*sample_prompts(KEY, "axis_skewed_linear_regression", 1000, 200, d))
    flat = xs.reshape(-1, d)
    cov = flat.T @ flat / flat.shape[0]  # mean is 0 by construction
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(cov))[::-1], lam, rtol=0.02)
    np.testing.assert_allclose(np.diag(cov), lam, rtol=0.02)  # axis-aligned
    assert abs(np.trace(cov) - d) < 0.05 * d
    # still a linear function: y = x · w, recovered by least squares
    w_hat = np.linalg.lstsq(xs[0], ys[0], rcond=None)[0]
    np.testing.assert_allclose(xs[0] @ w_hat, ys[0], atol=1e-4)
    # E[y²] = E[w^T Σ w] = trace Σ = d
    _within((ys ** 2).mean(axis=1), d)


# ----------------------------------------------------------------------------- relu_2nn
def _numpy_relu_2nn(rng, batch, n, d, hidden):
    """Independent sampler of the definition y = sqrt(2/h) sum_j W2_j relu(W1_j · x)."""
    x = rng.standard_normal((batch, n, d))
    w1 = rng.standard_normal((batch, d, hidden))
    w2 = rng.standard_normal((batch, hidden))
    return np.sqrt(2.0 / hidden) * np.einsum("bnh,bh->bn", np.maximum(x @ w1, 0.0), w2)


def test_relu_2nn_evaluates_the_definition():
    params = sample_functions(KEY, "relu_2nn", 3, 4, hidden=7)
    assert params["w1"].shape == (3, 7, 4) and params["w2"].shape == (3, 7)
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    w1, w2 = _np(params["w1"], params["w2"])
    expected = np.zeros((3, 5))
    for b in range(3):
        for i in range(5):
            for j in range(7):
                expected[b, i] += w2[b, j] * max(w1[b, j] @ x[b, i], 0.0)
    expected *= np.sqrt(2.0 / 7)
    np.testing.assert_allclose(np.asarray(evaluate("relu_2nn", params, jnp.asarray(x))), expected,
                               rtol=1e-4, atol=1e-5)


def test_relu_2nn_moments_match_closed_form_and_numpy():
    """E[y²] = (2/h) sum_j E[W2_j²] E[relu(W1_j · x)²] = (2/h) h E||x||²/2 = d; E[y] = 0."""
    d, batch, n, h = 6, 2000, 20, 100
    _, ys = _np(*sample_prompts(KEY, "relu_2nn", batch, n, d))
    ref = _numpy_relu_2nn(np.random.default_rng(0), batch, n, d, h)
    for sample in (ys, ref):
        _within((sample ** 2).mean(axis=1), d)
        _within(sample.mean(axis=1), 0.0)
    # compare higher moments of the two samplers (per-function means are the independent units)
    for moment in (lambda y: np.abs(y), lambda y: y ** 4):
        a, b = moment(ys).mean(axis=1), moment(ref).mean(axis=1)
        se = np.sqrt(a.var() / a.size + b.var() / b.size)
        assert abs(a.mean() - b.mean()) < 5 * se, (a.mean(), b.mean(), se)


# ----------------------------------------------------------------------------- decision tree
def _numpy_tree(coords, leaves, x):
    node = 0
    while node < len(coords):
        node = 2 * node + (2 if x[coords[node]] > 0 else 1)
    return leaves[node - len(coords)]


def test_decision_tree_matches_numpy_traversal():
    params = sample_functions(KEY, "decision_tree", 5, 6)
    coords, leaves = np.asarray(params["coords"]), np.asarray(params["leaves"])
    assert coords.shape == (5, 15) and leaves.shape == (5, 16)
    x = np.random.default_rng(2).standard_normal((5, 40, 6)).astype(np.float32)
    ys = np.asarray(evaluate("decision_tree", params, jnp.asarray(x)))
    expected = np.array([[_numpy_tree(coords[b], leaves[b], x[b, i]) for i in range(40)] for b in range(5)])
    np.testing.assert_array_equal(ys, expected)


@pytest.mark.parametrize("depth", [1, 4])
def test_decision_tree_is_piecewise_constant_on_sign_orthants(depth):
    d, n = 5, 300
    params = sample_functions(KEY, "decision_tree", 8, d, depth=depth)
    x = jax.random.normal(jax.random.PRNGKey(3), (8, n, d))
    ys = np.asarray(evaluate("decision_tree", params, x))
    # new magnitudes, same signs -> same outputs
    mags = jnp.abs(jax.random.normal(jax.random.PRNGKey(4), x.shape)) + 1e-3
    np.testing.assert_array_equal(np.asarray(evaluate("decision_tree", params, jnp.sign(x) * mags)), ys)
    leaves = np.asarray(params["leaves"])
    for b in range(8):
        assert len(np.unique(ys[b])) <= 2 ** depth
        assert np.all(np.isin(ys[b], leaves[b]))
    _, ys_p = sample_prompts(KEY, "decision_tree", 8, n, d, depth=depth)
    assert max(len(np.unique(r)) for r in np.asarray(ys_p)) <= 2 ** depth


def test_decision_tree_output_variance():
    """Leaves ~ N(0, 1) independent of the reached leaf: E[y] = 0, E[y²] = 1 = error_scale."""
    _, ys = _np(*sample_prompts(KEY, "decision_tree", 4000, 10, 5))
    _within((ys ** 2).mean(axis=1), 1.0)
    assert error_scale("decision_tree", 5) == 1.0


# ----------------------------------------------------------------------------- interleave, errors
def test_interleave_layout():
    xs = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    ys = -jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3)
    z = np.asarray(interleave(xs, ys))
    assert z.shape == (2, 6, 4)
    np.testing.assert_array_equal(z[:, 0::2], np.asarray(xs))
    np.testing.assert_array_equal(z[:, 1::2, 0], np.asarray(ys))
    assert np.all(z[:, 1::2, 1:] == 0)
    with pytest.raises(ValueError, match="ys"):
        interleave(xs, ys[:, :2])


def test_rotated_skewed_covariance_against_its_closed_form():
    """Garg et al.'s skewed inputs: x = z T, T = U diag(1/(i+1)) Uᵀ · sqrt(d / Σ 1/(i+1)²) with a random
    rotation U per batch, so cov(x) = Tᵀ T has eigenvalues d · (1/(i+1)²) / Σ_j 1/(j+1)² along random axes."""
    d = 6
    lam = 1.0 / np.arange(1, d + 1)
    eig_closed = d * lam ** 2 / np.sum(lam ** 2)
    t = np.asarray(skewed_transform(KEY, d), np.float64)
    np.testing.assert_allclose(t, t.T, atol=1e-6)                                    # U diag Uᵀ: symmetric
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(t.T @ t))[::-1], eig_closed, rtol=1e-4)
    assert abs(np.trace(t.T @ t) - d) < 1e-4
    key = jax.random.PRNGKey(4)
    xs = np.asarray(sample_xs(key, "skewed_linear_regression", 2000, 100, d), np.float64).reshape(-1, d)
    _, rotation_key = jax.random.split(key)
    t = np.asarray(skewed_transform(rotation_key, d), np.float64)                   # the batch's transform
    cov = xs.T @ xs / xs.shape[0]
    # each entry's standard error is at most sqrt(2) · λ_max / sqrt(n): allow 5 of them
    np.testing.assert_allclose(cov, t.T @ t, atol=5 * np.sqrt(2) * eig_closed[0] / np.sqrt(xs.shape[0]))
    assert np.max(np.abs(cov - np.diag(np.diag(cov)))) > 0.1                          # not axis-aligned
    other = np.asarray(skewed_transform(jax.random.PRNGKey(5), d), np.float64)
    assert np.max(np.abs(other - t)) > 0.1                                            # a fresh rotation per batch
    # the curriculum zeroes the inactive coordinates after the transform
    cut = np.asarray(sample_xs(key, "skewed_linear_regression", 4, 5, d, d_active=2))
    assert np.all(cut[..., 2:] == 0) and np.all(cut[..., :2] != 0)


def test_error_scale():
    assert error_scale("linear_regression", 20) == 20
    assert error_scale("skewed_linear_regression", 20) == 20
    assert error_scale("relu_2nn", 20) == 20
    assert error_scale("sparse_linear_regression", 20, k=3) == 3
    assert error_scale("linear_regression", 20, x_scale=2.0) == 80
    assert error_scale("sparse_linear_regression", 20, k=3, x_scale=0.5) == 0.75
    assert error_scale("decision_tree", 20, x_scale=3.0) == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_x_scale_scales_the_inputs_of_the_same_functions(task):
    """Scaled prompts have the same functions: xs scale by s, ys by s (positively homogeneous tasks) or not
    at all (trees split on signs)."""
    s = 2.5
    xs, ys = _np(*sample_prompts(KEY, task, 6, 9, 5))
    xs_s, ys_s = _np(*sample_prompts(KEY, task, 6, 9, 5, x_scale=s))
    np.testing.assert_allclose(xs_s, s * xs, rtol=1e-6)
    np.testing.assert_allclose(ys_s, ys if task == "decision_tree" else s * ys, rtol=1e-5, atol=1e-5)
    assert error_scale(task, 5, x_scale=s) == (1.0 if task == "decision_tree" else s * s * error_scale(task, 5))


@pytest.mark.parametrize("call,name", [
    (lambda: sample_prompts(KEY, "cubic", 2, 3, 4), "task"),
    (lambda: error_scale("cubic", 4), "task"),
    (lambda: sample_prompts(KEY, "linear_regression", 0, 3, 4), "batch"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 0, 4), "n_points"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 3, 0), "`d`"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 3, 4, d_active=5), "d_active"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 3, 4, d_active=0), "d_active"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 3, 4, noise_std=-1.0), "noise_std"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 3, 4, x_scale=0.0), "x_scale"),
    (lambda: sample_prompts(KEY, "sparse_linear_regression", 2, 3, 4, k=5), "`k`"),
    (lambda: sample_prompts(KEY, "sparse_linear_regression", 2, 3, 8, d_active=2, k=3), "`k`"),
    (lambda: sample_prompts(KEY, "sparse_linear_regression", 2, 3, 4, k=0), "`k`"),
    (lambda: sample_prompts(KEY, "linear_regression", 2, 3, 4, k=2), "unknown"),
    (lambda: sample_prompts(KEY, "relu_2nn", 2, 3, 4, hidden=0), "hidden"),
    (lambda: sample_prompts(KEY, "decision_tree", 2, 3, 4, depth=2.5), "depth"),
])
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ----------------------------------------------------------------------------- Garg et al.'s OOD suite
def _least_squares_error_at_queries(setting, d=4, n=10, batch=64):
    """Normalised (÷ d) squared error of minimum-norm least squares per position, counting each prompt at its
    query position (or every position)."""
    from experiments.icl.baselines import least_squares
    from mamba_jax.data.function_classes import garg_ood_prompts

    xs, ys, query = garg_ood_prompts(jax.random.PRNGKey(7), setting, batch, n, d, scale=2.0)
    xs, ys, query = np.asarray(xs, np.float64), np.asarray(ys, np.float64), np.asarray(query)
    err = (least_squares(xs, ys) - ys) ** 2 / d                                          # (m, n)
    out = np.zeros(n)
    for i in range(n):
        rows = (query == i) | (query == -1)
        out[i] = err[rows, i].mean() if rows.any() else np.nan
    return xs, ys, query, out


@pytest.mark.parametrize("setting", ["standard", "scale_x", "scale_y", "skewed", "random_quadrants"])
def test_ood_least_squares_is_exact_from_d_examples(setting):
    d = 4
    *_, err = _least_squares_error_at_queries(setting, d)
    assert np.all(err[d:] < 1e-8), err
    assert np.all(err[:d - 1] > 0.05), err                 # under-determined before d examples


def test_ood_closed_forms_of_the_prompting_strategies():
    d, n = 4, 10
    # half subspace: x lies in a d/2-dimensional subspace, so least squares is exact from d/2 examples
    xs, *_, err = _least_squares_error_at_queries("half_subspace", d, n)
    assert np.linalg.matrix_rank(xs.reshape(-1, d), tol=1e-4) == d // 2
    assert np.all(err[d // 2:] < 1e-8) and err[0] > 0.05
    # orthogonal: the query is orthogonal to every in-context x (same norm), so min-norm LS predicts 0
    xs, ys, query, err = _least_squares_error_at_queries("orthogonal_train_test", d, n)
    assert set(query.tolist()) == set(range(d))
    for i in range(1, d):
        rows = query == i
        cos = np.einsum("bkd,bd->bk", xs[rows, :i], xs[rows, i]) / (
            np.linalg.norm(xs[rows, :i], axis=-1) * np.linalg.norm(xs[rows, i], axis=-1)[:, None])
        # float32 projection (ε ≈ 6e-8) amplified by the rescaling when x_i lies near the span: 1e-3 in cosine
        assert np.max(np.abs(cos)) < 1e-3, np.max(np.abs(cos))
    from experiments.icl.baselines import least_squares
    at_query = least_squares(xs, ys)[np.arange(len(query)), query]
    assert np.max(np.abs(at_query[query > 0]) / np.abs(ys[np.arange(len(query)), query][query > 0]).mean()) < 1e-3
    # overlapping: the query repeats an in-context x, so noiseless least squares is exact from position 1
    xs, ys, query, err = _least_squares_error_at_queries("overlapping_train_test", d, n)
    assert np.all(err[1:] < 1e-8) and err[0] > 0.05
    for j in np.where(query > 0)[0][:20]:
        i = query[j]
        assert np.any(np.all(np.isclose(xs[j, :i], xs[j, i]), axis=-1))
    # random quadrants: every in-context x of a prompt shares its sign pattern
    xs, ys, query, _ = _least_squares_error_at_queries("random_quadrants", d, n)
    for j in np.where(query >= 2)[0][:20]:
        signs = np.sign(xs[j, :query[j]])
        assert np.all(signs == signs[0])
    # noisy linear regression: the labels are rescaled to std sqrt(d)
    _, ys, query, err = _least_squares_error_at_queries("noisy_linear_regression", d, n)
    assert abs(np.std(ys) - np.sqrt(d)) < 1e-3 and np.all(query == -1) and np.all(err[d + 1:] > 1e-3)
    # scale_y: the labels are twice standard's (same key, scale 2)
    from mamba_jax.data.function_classes import garg_ood_prompts
    _, y1, _ = garg_ood_prompts(jax.random.PRNGKey(7), "standard", 8, n, d)
    _, y2, _ = garg_ood_prompts(jax.random.PRNGKey(7), "scale_y", 8, n, d, scale=2.0)
    np.testing.assert_allclose(np.asarray(y2), 2 * np.asarray(y1), rtol=1e-6)
    with pytest.raises(ValueError, match="setting"):
        garg_ood_prompts(jax.random.PRNGKey(0), "rotated", 2, 3, d)
