"""Probing layer by layer (Grazzi et al.): is the model an iterative optimiser?

Every layer's residual stream goes through the trained final norm and read-out (the "logit lens",
`InContextRegressor(..., return_layer_predictions=True)`); a 1-D affine probe ``a · ŷ + c`` per layer,
fitted by least squares on held-out prompts, calibrates the scale of the early layers' predictions; the
calibrated per-layer error is compared with the error of gradient-descent iterations on the least-squares
objective of the same prompts (Garg et al.'s and von Oswald et al.'s yardstick).

All functions are pure; errors are normalised like `squared_error` (1 = always predicting 0).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import numpy as np

from experiments.icl.baselines import squared_error


def layer_predictions(model, params, xs, ys) -> np.ndarray:
    """(n_layer + 1, b, n) float64 logit-lens predictions: row 0 after the read-in, row i after layer i."""
    _, layers = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y, return_layer_predictions=True))(
        params, xs, ys)
    return np.asarray(layers, dtype=np.float64)


def fit_affine_probe(preds, targets, skip_first: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Least-squares ``targets ≈ a · preds + c`` per layer.

    preds: (L, b, n), targets: (b, n); positions before `skip_first` (no examples yet) are left out of the
    fit. Returns slopes a (L,) and intercepts c (L,). A constant layer (zero variance) gets a = 0, c = mean.
    """
    preds, targets = np.asarray(preds, np.float64), np.asarray(targets, np.float64)
    if preds.ndim != 3 or preds.shape[1:] != targets.shape:
        raise ValueError(f"fit_affine_probe: `preds` must be (L, b, n) with (b, n) = targets.shape "
                         f"{targets.shape}; got {preds.shape}")
    p = preds[:, :, skip_first:].reshape(preds.shape[0], -1)
    t = targets[:, skip_first:].reshape(-1)
    p_mean, t_mean = p.mean(axis=1), t.mean()
    cov = ((p - p_mean[:, None]) * (t - t_mean)[None]).mean(axis=1)
    var = ((p - p_mean[:, None]) ** 2).mean(axis=1)
    slope = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
    return slope, t_mean - slope * p_mean


def probe_errors(fit_layers, fit_ys, eval_layers, eval_ys, task: str, d: int) -> np.ndarray:
    """(L, n) normalised error of each layer's affine-probed predictions on the evaluation prompts."""
    slope, intercept = fit_affine_probe(fit_layers, fit_ys)
    calibrated = slope[:, None, None] * np.asarray(eval_layers, np.float64) + intercept[:, None, None]
    return np.stack([squared_error(layer, eval_ys, task, d) for layer in calibrated])


def gradient_descent_predictions(xs, ys, num_steps: int, step_size: float, relative: bool = False) -> np.ndarray:
    """(num_steps + 1, b, n) predictions of gradient descent on the in-context least-squares loss.

    For the prediction at position i, ``w`` starts at 0 and takes `num_steps` steps of
    ``w ← w − η · (G_i w − r_i)``, with ``G_i = mean_{j<i} x_j x_jᵀ`` and ``r_i = mean_{j<i} y_j x_j``
    (the gradient of ``½ mean_{j<i} (w·x_j − y_j)²``); row t is ``x_i · w_t``. ``η = step_size``, or with
    `relative` ``step_size / λ_max(G_i)`` per prompt and position (converges for any step_size in (0, 2):
    with few examples λ_max(G_i) ≈ |x|² is large, so one fixed step cannot suit every position).
    One absolute step of size 1 is the averaging estimator; many small steps converge to least squares.
    """
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if xs.ndim != 3 or ys.shape != xs.shape[:2]:
        raise ValueError(f"gradient_descent_predictions: need xs (b, n, d) and ys (b, n); got {xs.shape}, {ys.shape}")
    if int(num_steps) < 0 or not step_size > 0:
        raise ValueError(f"gradient_descent_predictions: need num_steps >= 0 and step_size > 0; got "
                         f"{num_steps}, {step_size}")
    b, n, d = xs.shape
    counts = np.maximum(np.arange(n), 1)[None, :, None]

    def before(a):  # sum over j < i along axis 1
        c = np.cumsum(a, axis=1)
        return np.concatenate([np.zeros_like(c[:, :1]), c[:, :-1]], axis=1)

    gram = before(xs[..., :, None] * xs[..., None, :]) / counts[..., None]  # (b, n, d, d)
    r = before(xs * ys[..., None]) / counts  # (b, n, d)
    eta = np.full((b, n, 1), float(step_size))
    if relative:
        top = np.linalg.eigvalsh(gram)[..., -1:]  # (b, n, 1); 0 only before the first example (then r = 0 too)
        eta = eta / np.where(top > 0, top, 1.0)
    w = np.zeros((b, n, d))
    rows = [np.einsum("bnd,bnd->bn", xs, w)]
    for _ in range(int(num_steps)):
        w = w - eta * (np.einsum("bnde,bne->bnd", gram, w) - r)
        rows.append(np.einsum("bnd,bnd->bn", xs, w))
    return np.stack(rows)


def gradient_descent_errors(xs, ys, task: str, d: int, num_steps: int,
                            step_sizes: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                            fit: Tuple = None) -> Dict:
    """Per-iteration normalised error (num_steps + 1, n) of gradient descent with a step relative to the
    curvature (``step_size / λ_max(G_i)``), the step size from `step_sizes` being the one with the lowest
    mean error over iterations 1..num_steps on the `fit` prompts (``(xs, ys)``; default the evaluation
    prompts). Returns {"step_size": relative step, "errors": array}."""
    fit_xs, fit_ys = (xs, ys) if fit is None else fit

    def errors(px, py, eta):
        with np.errstate(over="ignore", invalid="ignore"):  # a step >= 2 diverges: scored as inf
            preds = gradient_descent_predictions(px, py, num_steps, eta, relative=True)
            return np.stack([squared_error(p, py, task, d) for p in preds])

    def score(eta):
        value = float(np.mean(errors(fit_xs, fit_ys, eta)[1:]))
        return value if np.isfinite(value) else np.inf

    best = min(step_sizes, key=score)
    return dict(step_size=float(best), errors=errors(xs, ys, best))
