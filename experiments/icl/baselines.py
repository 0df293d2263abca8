"""Classical in-context regression baselines (Garg et al. 2022, arXiv 2208.01066, Sec. 3 / App. A).

Every baseline takes prompts ``xs`` (b, n, d) and ``ys`` (b, n), as returned by
`mamba_jax.data.function_classes.sample_prompts`, and returns predictions ``preds`` (b, n): for each
prompt and each position ``i``, ``preds[:, i]`` is a prediction of ``ys[:, i]`` computed only from the
``i`` earlier pairs ``(xs[:, j], ys[:, j])``, ``j < i``, and the query ``xs[:, i]`` (position 0 predicts
0). This is exactly the quantity the sequence models are scored on, so `squared_error` applies to both.

Baselines (``BASELINES_FOR_TASK`` says which ones each task gets, following Garg et al.'s ``eval.py``):

* `least_squares`: minimum-norm least squares (``pinv``) on each prefix, in float64.
* `averaging`: ``w_hat = mean_j y_j x_j``, predict ``x_i · w_hat``.
* `nearest_neighbours`: mean ``y`` of the ``k`` nearest earlier ``x`` (Euclidean; fewer if fewer exist).
* `lasso`: ``sklearn.linear_model.Lasso(alpha, fit_intercept=False)`` on each prefix.
* `decision_tree`: ``sklearn.tree.DecisionTreeRegressor(max_depth)`` on each prefix.
* `two_layer_nn`: a 2-layer ReLU net (``hidden`` units, biases, PyTorch default init) trained with
  Adam on the squared loss of each prefix; all ``b * n`` nets are trained at once (vmap).

All return a ``numpy.ndarray`` (b, n) with the dtype of ``xs`` (float32 unless float64 was given).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mamba_jax.data.function_classes import TASKS, error_scale

Baseline = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Elements of a (chunk, n, n, d) float64 temporary kept under about 2**23 (64 MiB).
_MAX_TEMP_ELEMENTS = 2 ** 23


# ----------------------------------------------------------------------------------------- checks

def _check_xy(name: str, xs, ys) -> Tuple[np.ndarray, np.ndarray]:
    """Validated numpy copies: ``xs`` (b, n, d) and ``ys`` (b, n), floating, finite shapes."""
    xs, ys = np.asarray(xs), np.asarray(ys)
    if xs.ndim != 3 or min(xs.shape) < 1:
        raise ValueError(f"{name}: `xs` must be a non-empty (b, n, d) array; got shape {xs.shape}")
    if ys.shape != xs.shape[:2]:
        raise ValueError(f"{name}: `ys` must have shape (b, n) = {xs.shape[:2]}; got {ys.shape}")
    for arg, a in (("xs", xs), ("ys", ys)):
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name}: `{arg}` must be a real numeric array; got dtype {a.dtype}")
    return xs, ys


def _out_dtype(xs: np.ndarray):
    return np.float64 if xs.dtype == np.float64 else np.float32


def _positive_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int; got {value!r}")
    return int(value)


def _positive_float(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: `{name}` must be a finite number > 0; got {value!r}")
    return float(value)


def _chunk(b: int, n: int, d: int) -> int:
    return max(1, min(b, _MAX_TEMP_ELEMENTS // max(1, n * n * d)))


# ------------------------------------------------------------------------------------- baselines

def least_squares(xs, ys) -> np.ndarray:
    """Minimum-norm least squares on each prefix: (b, n, d), (b, n) -> (b, n).

    ``preds[:, i] = xs[:, i] · pinv(X_i) y_i`` with ``X_i = xs[:, :i]`` (i x d), ``y_i = ys[:, :i]``;
    for ``i < d`` this is the minimum-norm interpolant (as ``torch/np.linalg.lstsq``). Computed in float64
    with one batched ``pinv`` over all prefixes: prefix ``i`` is the full (n x d) matrix with rows
    ``j >= i`` zeroed, which leaves the minimum-norm solution unchanged.
    """
    xs, ys = _check_xy("least_squares", xs, ys)
    b, n, d = xs.shape
    x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
    before = np.tri(n, n, -1)  # before[i, j] = 1 iff j < i
    out = np.empty((b, n), dtype=np.float64)
    step = _chunk(b, n, d)
    for s in range(0, b, step):
        xc, yc = x64[s:s + step], y64[s:s + step]
        xm = xc[:, None, :, :] * before[None, :, :, None]  # (c, i, j, d)
        ym = yc[:, None, :] * before[None]  # (c, i, j)
        w = np.einsum("cidj,cij->cid", np.linalg.pinv(xm), ym)  # (c, i, d)
        out[s:s + step] = np.einsum("cid,cid->ci", xc, w)
    out[:, 0] = 0.0
    return out.astype(_out_dtype(xs))


def averaging(xs, ys) -> np.ndarray:
    """Averaging estimator: (b, n, d), (b, n) -> (b, n), ``preds[:, i] = xs[:, i] · mean_{j<i} y_j x_j``."""
    xs, ys = _check_xy("averaging", xs, ys)
    x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
    n = xs.shape[1]
    csum = np.cumsum(x64 * y64[..., None], axis=1)  # csum[:, i] = sum_{j<=i} y_j x_j
    prev = np.concatenate([np.zeros_like(csum[:, :1]), csum[:, :-1]], axis=1)  # sum_{j<i}
    counts = np.maximum(np.arange(n), 1)[None, :, None]
    out = np.einsum("bid,bid->bi", x64, prev / counts)
    out[:, 0] = 0.0
    return out.astype(_out_dtype(xs))


def nearest_neighbours(xs, ys, k: int = 3) -> np.ndarray:
    """k-nearest-neighbours regression: (b, n, d), (b, n) -> (b, n).

    ``preds[:, i]`` is the mean of ``ys[:, j]`` over the ``min(k, i)`` earlier points ``j < i`` closest
    to ``xs[:, i]`` in Euclidean distance (ties go to the earlier point); position 0 predicts 0.
    """
    xs, ys = _check_xy("nearest_neighbours", xs, ys)
    k = _positive_int("nearest_neighbours", "k", k)
    b, n, d = xs.shape
    x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
    later = ~np.tri(n, n, -1, dtype=bool)  # later[i, j] iff j >= i (not available to position i)
    kk = min(k, n)
    out = np.empty((b, n), dtype=np.float64)
    step = _chunk(b, n, d)
    for s in range(0, b, step):
        xc, yc = x64[s:s + step], y64[s:s + step]
        dist2 = np.sum((xc[:, :, None, :] - xc[:, None, :, :]) ** 2, axis=-1)  # (c, i, j)
        dist2 = np.where(later[None], np.inf, dist2)
        order = np.argsort(dist2, axis=-1, kind="stable")[..., :kk]  # (c, i, kk)
        valid = order < np.arange(n)[None, :, None]  # exactly min(k, i) valid per row
        yk = np.take_along_axis(np.broadcast_to(yc[:, None, :], dist2.shape), order, axis=-1)
        out[s:s + step] = np.sum(yk * valid, axis=-1) / np.maximum(np.sum(valid, axis=-1), 1)
    out[:, 0] = 0.0
    return out.astype(_out_dtype(xs))


def _fit_lasso(x: np.ndarray, y: np.ndarray, alpha: float, max_iter: int):
    from sklearn.linear_model import Lasso
    from sklearn.exceptions import ConvergenceWarning
    model = Lasso(alpha=alpha, fit_intercept=False, max_iter=max_iter)
    with warnings.catch_warnings():
        # Garg et al. raise on non-convergence; we keep the (max_iter-limited) fit instead.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def lasso(xs, ys, alpha: float, max_iter: int = 100_000) -> np.ndarray:
    """Lasso (no intercept) on each prefix: (b, n, d), (b, n) -> (b, n).

    ``sklearn.linear_model.Lasso(alpha, fit_intercept=False, max_iter)`` minimises
    ``||y - X w||² / (2 i) + alpha ||w||_1`` on the ``i`` earlier pairs; position 0 predicts 0.
    A plain loop over prompts and positions (``b * (n - 1)`` fits).
    """
    xs, ys = _check_xy("lasso", xs, ys)
    alpha = _positive_float("lasso", "alpha", alpha)
    max_iter = _positive_int("lasso", "max_iter", max_iter)
    b, n, _ = xs.shape
    x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
    out = np.zeros((b, n), dtype=np.float64)
    for bi in range(b):
        for i in range(1, n):
            model = _fit_lasso(x64[bi, :i], y64[bi, :i], alpha, max_iter)
            out[bi, i] = x64[bi, i] @ model.coef_
    return out.astype(_out_dtype(xs))


def _fit_decision_tree(x: np.ndarray, y: np.ndarray, max_depth: Optional[int]):
    from sklearn.tree import DecisionTreeRegressor
    return DecisionTreeRegressor(max_depth=max_depth, random_state=0).fit(x, y)


def decision_tree(xs, ys, max_depth: Optional[int] = None) -> np.ndarray:
    """CART regression tree on each prefix: (b, n, d), (b, n) -> (b, n).

    ``sklearn.tree.DecisionTreeRegressor(max_depth)`` (``None``: grown until leaves are pure) fitted to
    the ``i`` earlier pairs, evaluated at ``xs[:, i]``; position 0 predicts 0. ``random_state=0`` makes
    the tie-breaking among equally good splits deterministic.
    """
    xs, ys = _check_xy("decision_tree", xs, ys)
    if max_depth is not None:
        max_depth = _positive_int("decision_tree", "max_depth", max_depth)
    b, n, _ = xs.shape
    x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
    out = np.zeros((b, n), dtype=np.float64)
    for bi in range(b):
        for i in range(1, n):
            model = _fit_decision_tree(x64[bi, :i], y64[bi, :i], max_depth)
            out[bi, i] = model.predict(x64[bi, i:i + 1])[0]
    return out.astype(_out_dtype(xs))


def _init_net(key: jax.Array, d: int, hidden: int) -> Dict[str, jax.Array]:
    """PyTorch ``nn.Linear`` default init: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    a1, a2 = 1.0 / np.sqrt(d), 1.0 / np.sqrt(hidden)
    return {"w1": jax.random.uniform(k1, (hidden, d), jnp.float32, -a1, a1),
            "b1": jax.random.uniform(k2, (hidden,), jnp.float32, -a1, a1),
            "w2": jax.random.uniform(k3, (hidden,), jnp.float32, -a2, a2),
            "b2": jax.random.uniform(k4, (), jnp.float32, -a2, a2)}


def _net(p: Dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """(..., d) -> (...)."""
    return jax.nn.relu(x @ p["w1"].T + p["b1"]) @ p["w2"] + p["b2"]


@functools.partial(jax.jit, static_argnames=("hidden", "steps"))
def _train_nets(xs, ys, key, lr, *, hidden: int, steps: int):
    b, n, d = xs.shape
    keys = jax.random.split(key, b * n).reshape(b, n, -1)
    params = jax.vmap(jax.vmap(lambda k: _init_net(k, d, hidden)))(keys)  # leaves (b, n, ...)
    before = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # before[i, j] iff j < i
    counts = jnp.maximum(jnp.arange(n), 1).astype(jnp.float32)

    def prompt_loss(p, x, y):  # p leaves (n, ...): net i of one prompt; x (n, d), y (n,)
        f = jax.vmap(_net, in_axes=(0, None))(p, x)  # (i, j): net i on point j
        return jnp.sum(jnp.sum(jnp.where(before, (f - y[None]) ** 2, 0.0), axis=1) / counts)

    def total_loss(p):  # nets are independent: the gradient of the sum is each net's own gradient
        return jnp.sum(jax.vmap(prompt_loss)(p, xs, ys))

    opt = optax.adam(lr)  # elementwise, so one Adam over all nets == an independent Adam per net

    def step(carry, _):
        p, state = carry
        grads = jax.grad(total_loss)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    preds = jax.vmap(jax.vmap(_net))(params, xs)  # net (b, i) on its query xs[b, i]
    return preds.at[:, 0].set(0.0)


def two_layer_nn(xs, ys, hidden: int = 100, steps: int = 100, lr: float = 5e-3,
                 seed: int = 0) -> np.ndarray:
    """A 2-layer ReLU net trained on each prefix with Adam: (b, n, d), (b, n) -> (b, n).

    Net ``(b, i)`` is ``x -> w2 · relu(W1 x + b1) + b2`` (``hidden`` units, PyTorch default init, key
    derived from ``seed``), trained for ``steps`` full-batch Adam steps (learning rate ``lr``) on the mean
    squared error over the ``i`` earlier pairs of prompt ``b``, then evaluated at ``xs[b, i]``; position
    0 predicts 0. Defaults follow Garg et al.'s ``eval.py`` (hidden 100, Adam, lr 5e-3, 100 steps, batch
    100 -- the whole prefix whenever ``i <= 100``). All ``b * n`` nets train together in one jitted scan;
    the work per step is ``O(b n² hidden d)``.
    """
    xs, ys = _check_xy("two_layer_nn", xs, ys)
    hidden = _positive_int("two_layer_nn", "hidden", hidden)
    steps = _positive_int("two_layer_nn", "steps", steps)
    lr = _positive_float("two_layer_nn", "lr", lr)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"two_layer_nn: `seed` must be an int; got {seed!r}")
    preds = _train_nets(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32),
                        jax.random.PRNGKey(int(seed)), jnp.float32(lr), hidden=hidden, steps=steps)
    return np.asarray(preds).astype(_out_dtype(xs))


# ------------------------------------------------------------------------------------ per task

LASSO_ALPHAS = (1.0, 0.1, 0.01, 0.001, 0.0001)

_COMMON: List[Tuple[str, Baseline]] = [
    ("least_squares", least_squares),
    ("averaging", averaging),
    ("3-nn", functools.partial(nearest_neighbours, k=3)),
]

BASELINES_FOR_TASK: Dict[str, List[Tuple[str, Baseline]]] = {
    "linear_regression": list(_COMMON),
    "skewed_linear_regression": list(_COMMON),
    "axis_skewed_linear_regression": list(_COMMON),
    "sparse_linear_regression": list(_COMMON) + [
        (f"lasso_alpha={a:g}", functools.partial(lasso, alpha=a)) for a in LASSO_ALPHAS],
    "relu_2nn": list(_COMMON) + [("2nn_adam", two_layer_nn)],
    "decision_tree": list(_COMMON) + [
        ("decision_tree_depth=4", functools.partial(decision_tree, max_depth=4)),
        ("decision_tree_unlimited", functools.partial(decision_tree, max_depth=None)),
    ],
}
assert set(BASELINES_FOR_TASK) == set(TASKS)


def squared_error(preds, ys, task: str, d: int, k: int = 3, x_scale: float = 1.0) -> np.ndarray:
    """Normalised squared error per position: (b, n) preds and ys -> (n,) float64,
    ``mean_b (preds - ys)² / error_scale(task, d, k, x_scale)`` (1 = the error of always predicting 0)."""
    preds, ys = np.asarray(preds), np.asarray(ys)
    if preds.ndim != 2 or min(preds.shape) < 1:
        raise ValueError(f"squared_error: `preds` must be a non-empty (b, n) array; got shape {preds.shape}")
    if ys.shape != preds.shape:
        raise ValueError(f"squared_error: `ys` must have the shape of `preds` {preds.shape}; got {ys.shape}")
    scale = error_scale(task, d, k, x_scale)
    diff = preds.astype(np.float64) - ys.astype(np.float64)
    return np.mean(diff ** 2, axis=0) / scale
