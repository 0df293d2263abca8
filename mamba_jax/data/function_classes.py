"""In-context regression prompts (Garg et al. 2022, arXiv 2208.01066; Grazzi et al. 2024, arXiv 2402.03170).

Each prompt is one random function f from a function class, evaluated at ``n_points`` random inputs:
``xs[b, i] ~ N(0, I_d)`` (or ``N(0, Σ)`` for the skewed tasks) and ``ys[b, i] = f_b(xs[b, i])``. A model
reads the interleaved sequence ``x_1, y_1, x_2, y_2, ...`` (`mamba_jax.models.icl.interleave`) and
predicts ``y_i`` from ``x_i`` and the ``i - 1`` earlier pairs.

Function classes (``TASKS``), all pure jax functions of a PRNG key:

* ``linear_regression``: ``y = x · w``, ``w ~ N(0, I_d)``.
* ``skewed_linear_regression``: same, but ``x = z T`` with ``z ~ N(0, I_d)`` and Garg et al.'s transform
  ``T = U diag(λ) Uᵀ · sqrt(d / Σλ²)``, ``λ_i = 1 / (i + 1)``, ``U`` a uniformly random rotation drawn
  afresh for every batch (Grazzi et al. train on it so; Garg et al. evaluate on one draw): covariance
  ``Σ = Tᵀ T`` with eigenvalues ∝ ``1 / (i + 1)²`` along random directions, ``trace Σ = d``.
* ``axis_skewed_linear_regression``: the easier axis-aligned variant, ``Σ = diag(λ)``,
  ``λ_i ∝ 1 / (i + 1)``, ``trace Σ = d`` (one fixed preconditioner for every prompt).
* ``sparse_linear_regression``: ``w ~ N(0, I)`` with all but ``k`` (default 3) random coordinates zeroed.
* ``relu_2nn``: ``y = sqrt(2 / h) · Σ_j W2_j relu(W1_j · x)``, ``W1_j ~ N(0, I_d)``, ``W2_j ~ N(0, 1)``,
  ``h = hidden`` (default 100) hidden units. With this scaling ``E[y²] = E||x||² = d``.
* ``decision_tree``: a full binary tree of depth ``depth`` (default 4), heap layout (children of node
  ``n`` are ``2n + 1`` (x_c <= 0) and ``2n + 2`` (x_c > 0)); each internal node splits on the sign of a
  coordinate drawn uniformly among the active ones, the ``2**depth`` leaves hold values ``~ N(0, 1)``.

Curriculum (Garg et al. Sec. 4): with ``d_active < d`` only the first ``d_active`` coordinates of every
``x`` are nonzero; weights / split coordinates / sparse supports live on those coordinates too.

The functions can also be sampled and evaluated separately (`sample_functions`, `evaluate`), e.g. to
query the same function at fresh points.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("linear_regression", "skewed_linear_regression", "axis_skewed_linear_regression",
         "sparse_linear_regression", "relu_2nn", "decision_tree")

# Task-specific keyword arguments and their defaults.
_TASK_KWARGS = {
    "linear_regression": {},
    "skewed_linear_regression": {},
    "axis_skewed_linear_regression": {},
    "sparse_linear_regression": {"k": 3},
    "relu_2nn": {"hidden": 100},
    "decision_tree": {"depth": 4},
}

Params = Dict[str, jax.Array]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"function_classes: `{name}` must be a positive int; got {value!r}")
    return int(value)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"function_classes: `task` must be one of {TASKS}; got {task!r}")


def _task_kwargs(task: str, d_active: int, kwargs: dict) -> dict:
    """Defaults merged with `kwargs`, validated (unknown names and bad sizes raise ValueError)."""
    allowed = _TASK_KWARGS[task]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"function_classes: task {task!r} takes keyword arguments {sorted(allowed)}; "
                         f"got unknown {unknown}")
    out = {**allowed, **kwargs}
    for name, value in out.items():
        _positive_int(name, value)
    if "k" in out and out["k"] > d_active:
        raise ValueError(f"function_classes: `k` must be <= d_active = {d_active}; got {out['k']}")
    return out


def _resolve_d_active(d: int, d_active: Optional[int]) -> int:
    _positive_int("d", d)
    if d_active is None:
        return d
    _positive_int("d_active", d_active)
    if d_active > d:
        raise ValueError(f"function_classes: `d_active` must be <= d = {d}; got {d_active}")
    return int(d_active)


def error_scale(task: str, d: int, k: int = 3, x_scale: float = 1.0) -> float:
    """The squared-error normaliser: ``E[y²]`` of the task, i.e. the error of always predicting 0.

    ``d`` for the dense regression tasks (linear, both skewed, relu_2nn), ``k`` for sparse linear regression,
    1 for decision trees (leaf values ~ N(0, 1)); times ``x_scale²`` for inputs scaled by ``x_scale``
    (every task but the trees is positively homogeneous of degree 1 in x).
    """
    _check_task(task)
    _positive_int("d", d)
    if task == "decision_tree":
        return 1.0
    scale = float(_positive_int("k", k)) if task == "sparse_linear_regression" else float(d)
    return scale * float(x_scale) ** 2


def skewed_eigenvalues(d: int) -> jax.Array:
    """(d,) eigenvalues of the axis-aligned skewed covariance: ``λ_i ∝ 1 / (i + 1)`` with ``sum(λ) = d``."""
    lam = 1.0 / jnp.arange(1, _positive_int("d", d) + 1, dtype=jnp.float32)
    return lam * (d / jnp.sum(lam))


def skewed_transform(key: jax.Array, d: int) -> jax.Array:
    """(d, d) Garg et al.'s skewing transform ``T = U diag(λ) Uᵀ · sqrt(d / Σλ²)``, ``λ_i = 1 / (i + 1)``,
    with ``U`` the left singular vectors of a standard Gaussian matrix (a uniformly random rotation):
    ``x = z T`` for ``z ~ N(0, I_d)`` has covariance ``Tᵀ T``, eigenvalues ``λ_i² · d / Σλ²`` (trace d)."""
    lam = 1.0 / jnp.arange(1, _positive_int("d", d) + 1, dtype=jnp.float32)
    u, _, _ = jnp.linalg.svd(jax.random.normal(key, (d, d), dtype=jnp.float32))
    return (u * lam) @ u.T * jnp.sqrt(d / jnp.sum(lam ** 2))


def _active_mask(d: int, d_active: int) -> jax.Array:
    return (jnp.arange(d) < d_active).astype(jnp.float32)


def sample_xs(key: jax.Array, task: str, batch: int, n_points: int, d: int,
              d_active: Optional[int] = None) -> jax.Array:
    """(batch, n_points, d) float32 inputs: N(0, I_d); for the skewed task ``z T`` with one fresh
    `skewed_transform` per call (per batch); for the axis-aligned one N(0, diag(λ)). Coordinates from
    ``d_active`` on are zeroed (after the transform, as Garg et al.'s sampler does)."""
    _check_task(task)
    batch, n_points = _positive_int("batch", batch), _positive_int("n_points", n_points)
    d_active = _resolve_d_active(d, d_active)
    if task == "skewed_linear_regression":
        key, rotation_key = jax.random.split(key)
        xs = jax.random.normal(key, (batch, n_points, d), dtype=jnp.float32) @ skewed_transform(rotation_key, d)
    else:
        xs = jax.random.normal(key, (batch, n_points, d), dtype=jnp.float32)
    if task == "axis_skewed_linear_regression":
        xs = xs * jnp.sqrt(skewed_eigenvalues(d))
    return xs * _active_mask(d, d_active)


def sample_functions(key: jax.Array, task: str, batch: int, d: int, *, d_active: Optional[int] = None,
                     **task_kwargs) -> Params:
    """Parameters of ``batch`` random functions of the class ``task``, as a dict of arrays:

    * linear / skewed / axis-skewed / sparse: ``{"w": (batch, d)}`` (zero outside the active coordinates; for sparse
      exactly ``k`` nonzeros, almost surely);
    * relu_2nn: ``{"w1": (batch, hidden, d), "w2": (batch, hidden)}``;
    * decision_tree: ``{"coords": (batch, 2**depth - 1) int32, "leaves": (batch, 2**depth)}``.
    """
    _check_task(task)
    batch = _positive_int("batch", batch)
    d_active = _resolve_d_active(d, d_active)
    kw = _task_kwargs(task, d_active, task_kwargs)
    k1, k2 = jax.random.split(key)
    mask = _active_mask(d, d_active)
    if task == "relu_2nn":
        w1 = jax.random.normal(k1, (batch, kw["hidden"], d), dtype=jnp.float32) * mask
        return {"w1": w1, "w2": jax.random.normal(k2, (batch, kw["hidden"]), dtype=jnp.float32)}
    if task == "decision_tree":
        n_leaves = 2 ** kw["depth"]
        coords = jax.random.randint(k1, (batch, n_leaves - 1), 0, d_active, dtype=jnp.int32)
        return {"coords": coords, "leaves": jax.random.normal(k2, (batch, n_leaves), dtype=jnp.float32)}
    w = jax.random.normal(k1, (batch, d), dtype=jnp.float32) * mask
    if task == "sparse_linear_regression":
        # rank of a uniform draw = a uniformly random permutation of the active coordinates; keep k.
        u = jax.random.uniform(k2, (batch, d_active))
        keep = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1) < kw["k"]
        w = w * jnp.pad(keep, ((0, 0), (0, d - d_active))).astype(jnp.float32)
    return {"w": w}


def _eval_tree(coords: jax.Array, leaves: jax.Array, xs: jax.Array) -> jax.Array:
    """Vectorised heap traversal: (b, 2^D - 1) coords, (b, 2^D) leaves, (b, n, d) xs -> (b, n)."""
    n_internal = coords.shape[-1]
    depth = int(np.log2(n_internal + 1))
    node = jnp.zeros(xs.shape[:2], dtype=jnp.int32)  # (b, n)
    for _ in range(depth):
        c = jnp.take_along_axis(coords, node, axis=1)  # (b, n) split coordinate per point
        xc = jnp.take_along_axis(xs, c[..., None], axis=2)[..., 0]
        node = 2 * node + 1 + (xc > 0).astype(jnp.int32)
    return jnp.take_along_axis(leaves, node - n_internal, axis=1)


def evaluate(task: str, params: Params, xs: jax.Array) -> jax.Array:
    """``ys[b, i] = f_b(xs[b, i])``: (batch, n, d) inputs -> (batch, n) float32 outputs."""
    _check_task(task)
    if task == "relu_2nn":
        h = params["w1"].shape[1]
        pre = jnp.einsum("bnd,bhd->bnh", xs, params["w1"])
        return jnp.sqrt(2.0 / h) * jnp.einsum("bnh,bh->bn", jax.nn.relu(pre), params["w2"])
    if task == "decision_tree":
        return _eval_tree(params["coords"], params["leaves"], xs)
    return jnp.einsum("bnd,bd->bn", xs, params["w"])


def sample_prompts(key: jax.Array, task: str, batch: int, n_points: int, d: int, *,
                   d_active: Optional[int] = None, noise_std: float = 0.0, x_scale: float = 1.0,
                   **task_kwargs) -> Tuple[jax.Array, jax.Array]:
    """``batch`` prompts of ``n_points`` (x, y) pairs, a deterministic function of ``key``.

    Returns ``xs`` (batch, n_points, d) float32 and ``ys`` (batch, n_points) float32, with
    ``ys = f(xs) + noise_std * N(0, 1)``. ``x_scale`` multiplies the inputs (Garg et al.'s out-of-distribution
    "scaled x" test; the functions are the same for every scale, so ``y`` scales with it for the linear
    tasks and ReLU nets and not at all for trees). ``task_kwargs``: ``k`` (sparse), ``hidden`` (relu_2nn),
    ``depth`` (decision_tree).
    """
    _check_task(task)
    if not isinstance(noise_std, (int, float, np.floating)) or isinstance(noise_std, bool) or noise_std < 0:
        raise ValueError(f"function_classes: `noise_std` must be a float >= 0; got {noise_std!r}")
    if not isinstance(x_scale, (int, float, np.floating)) or isinstance(x_scale, bool) or not x_scale > 0:
        raise ValueError(f"function_classes: `x_scale` must be a float > 0; got {x_scale!r}")
    kx, kf, kn = jax.random.split(key, 3)
    params = sample_functions(kf, task, batch, d, d_active=d_active, **task_kwargs)
    xs = sample_xs(kx, task, batch, n_points, d, d_active) * x_scale
    ys = evaluate(task, params, xs)
    if noise_std > 0:
        ys = ys + noise_std * jax.random.normal(kn, ys.shape, dtype=jnp.float32)
    return xs, ys.astype(jnp.float32)


# ---- Garg et al.'s out-of-distribution suite for linear regression -------------------------------------------

GARG_OOD_SETTINGS = ("standard", "random_quadrants", "orthogonal_train_test", "overlapping_train_test",
                     "half_subspace", "skewed", "scale_x", "scale_y", "noisy_linear_regression")


def _rotated_transform(key: jax.Array, eigenvalues: jax.Array, normalize: bool) -> jax.Array:
    """``U diag(eigenvalues) Uᵀ`` (U: a random rotation), scaled by sqrt(d / Σ eigenvalues²) when `normalize`
    (Garg et al.'s `sample_transformation`)."""
    d = eigenvalues.shape[0]
    u, _, _ = jnp.linalg.svd(jax.random.normal(key, (d, d), dtype=jnp.float32))
    t = (u * eigenvalues) @ u.T
    return t * jnp.sqrt(d / jnp.sum(eigenvalues ** 2)) if normalize else t


def _query_prompts(train: jax.Array, test: jax.Array, n_queries: int) -> Tuple[jax.Array, jax.Array]:
    """For each query position i < n_queries the prompt train[:i] ++ test[i:] (Garg et al.'s `eval_batch`
    with `xs_p`): ((n_queries · b, n, d) inputs, (n_queries · b,) query positions)."""
    b, n, _ = train.shape
    take = jnp.arange(n)[None, :, None] < jnp.arange(n_queries)[:, None, None]          # (q, n, 1)
    xs = jnp.where(take[:, None], train[None], test[None])                               # (q, b, n, d)
    return xs.reshape(n_queries * b, n, -1), jnp.repeat(jnp.arange(n_queries, dtype=jnp.int32), b)


def garg_ood_prompts(key: jax.Array, setting: str, batch: int, n_points: int, d: int, *,
                     scale: float = 1.0) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Garg et al.'s evaluation prompts for linear regression (dtsip/in-context-learning, `build_evals`):
    ``(xs (m, n, d), ys (m, n), query (m,) int32)``; a prompt's error counts at position ``query`` only, or at
    every position where ``query`` is -1. Normalise errors by d (`error_scale`), as Garg et al. do.

    * standard: x ~ N(0, I), y = x · w, w ~ N(0, I).
    * random_quadrants: the in-context x's share one random orthant (|x| · a sign pattern per prompt), the
      query is a fresh Gaussian x.
    * orthogonal_train_test: query i is x_i minus its projection on span(x_0..x_{i-1}), rescaled to ‖x_i‖
      (queries i < min(n, d)).
    * overlapping_train_test: query i (≥ 1) repeats one of the i in-context x's, drawn uniformly.
    * half_subspace: x = z T, T a random rotation of diag(1, …, 1, 0, …, 0) (d // 2 ones), normalised: x lies
      in a random d//2-dimensional subspace, E‖x‖² = d.
    * skewed: x = z T with one `skewed_transform` for the whole evaluation (Garg et al. draw it once).
    * scale_x: x = scale · z; scale_y: y = scale · x · w.
    * noisy_linear_regression: y = x · w + N(0, 1), then rescaled to std sqrt(d) over the batch.
    """
    if setting not in GARG_OOD_SETTINGS:
        raise ValueError(f"garg_ood_prompts: `setting` must be one of {GARG_OOD_SETTINGS}; got {setting!r}")
    batch, n_points, d = _positive_int("batch", batch), _positive_int("n_points", n_points), _positive_int("d", d)
    if not scale > 0:
        raise ValueError(f"garg_ood_prompts: `scale` must be > 0; got {scale!r}")
    kx, kw, kt, kn = jax.random.split(key, 4)
    z = jax.random.normal(kx, (batch, n_points, d), dtype=jnp.float32)
    w = jax.random.normal(kw, (batch, d), dtype=jnp.float32)
    every = jnp.full((batch,), -1, jnp.int32)
    if setting in ("standard", "scale_x", "scale_y", "half_subspace", "skewed", "noisy_linear_regression"):
        xs = z
        if setting == "scale_x":
            xs = z * scale
        elif setting == "half_subspace":
            xs = z @ _rotated_transform(kt, (jnp.arange(d) < d // 2).astype(jnp.float32), normalize=True)
        elif setting == "skewed":
            xs = z @ skewed_transform(kt, d)
        ys = jnp.einsum("bnd,bd->bn", xs, w) * (scale if setting == "scale_y" else 1.0)
        if setting == "noisy_linear_regression":
            ys = ys + jax.random.normal(kn, ys.shape, dtype=jnp.float32)
            ys = ys * jnp.sqrt(d) / jnp.std(ys)
        return xs, ys, every
    if setting == "random_quadrants":
        pattern = jnp.sign(jax.random.normal(kt, (batch, 1, d)))
        xs, query = _query_prompts(jnp.abs(z) * pattern, z, n_points)
    elif setting == "orthogonal_train_test":
        tests = [z[:, 0]]
        for i in range(1, min(n_points, d)):
            prev = z[:, :i]                                                                # (b, i, d)
            _, _, vt = jnp.linalg.svd(prev, full_matrices=False)                           # (b, i, d)
            proj = jnp.einsum("bd,bkd,bke->be", z[:, i], vt, vt)
            ortho = z[:, i] - proj
            tests.append(ortho * jnp.linalg.norm(z[:, i], axis=-1, keepdims=True)
                         / jnp.linalg.norm(ortho, axis=-1, keepdims=True))
        test = jnp.zeros_like(z).at[:, :len(tests)].set(jnp.stack(tests, 1))
        xs, query = _query_prompts(z, test, min(n_points, d))
    else:   # overlapping_train_test
        pick = jnp.floor(jax.random.uniform(kt, (batch, n_points)) * jnp.arange(n_points)).astype(jnp.int32)
        test = jnp.take_along_axis(z, pick[..., None], axis=1)                             # x_{pick_i}, pick_i < i
        xs, query = _query_prompts(z, test, n_points)
    reps = xs.shape[0] // batch
    ys = jnp.einsum("mnd,md->mn", xs, jnp.tile(w, (reps, 1)))
    return xs, ys, query
