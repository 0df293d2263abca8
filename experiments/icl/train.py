"""Training an `InContextRegressor` on the Garg et al. function classes, with their curriculum.

Pure pieces the run entry composes: the curriculum schedule, the loss (squared error at the x tokens,
averaged over every position, as Garg et al.), a jitted train step, the per-position evaluation, and a
`train` loop with a tqdm bar. Each step's prompts are a pure function of (seed, step).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments.icl.baselines import squared_error
from mamba_jax.data.function_classes import sample_prompts
from mamba_jax.models.icl import InContextRegressor
from mamba_jax.train import create_train_state

INIT_STREAM = 2 ** 31 - 1  # the parameters' key: fold_in ids below it are the training steps'
LINEAR_TASKS = ("linear_regression", "skewed_linear_regression", "axis_skewed_linear_regression",
                "sparse_linear_regression")


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """A value that starts at `start` and grows by `increment` every `interval` steps up to `end`."""

    start: int
    end: int
    increment: int
    interval: int

    def __post_init__(self):
        if not 1 <= self.start <= self.end or self.increment < 0 or self.interval < 1:
            raise ValueError(f"Curriculum: need 1 <= start <= end, increment >= 0, interval >= 1; got {self}")

    def value(self, step: int) -> int:
        return min(self.end, self.start + self.increment * (step // self.interval))


def paper_curricula(task: str, d: int = 20, interval: int = 2000):
    """(dimensions, points) curricula of Garg et al.: dimension 5 → d (+1), points 11 → 41 (+2) for the
    linear tasks and 26 → 101 (+5) for ReLU nets and trees, each step every `interval` steps."""
    dims = Curriculum(min(5, d), d, 1, interval)
    points = Curriculum(11, 41, 2, interval) if task in LINEAR_TASKS else Curriculum(26, 101, 5, interval)
    return dims, points


def icl_loss(preds, ys):
    """Mean squared error over every prompt and position: preds, ys (b, n) -> scalar."""
    return jnp.mean(jnp.square(preds.astype(jnp.float32) - ys.astype(jnp.float32)))


def make_train_step(donate: bool = True) -> Callable:
    """A jitted ``step(state, xs, ys) -> (state, loss)`` (one compilation per prompt length)."""

    def step(state, xs, ys):
        def loss_fn(params):
            return icl_loss(state.apply_fn({"params": params}, xs, ys), ys)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return jax.jit(step, donate_argnums=(0,) if donate else ())


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(learning_rate: float, schedule: str = "constant", num_steps: int = 1):
    """Garg et al.'s constant rate, or "cosine": linear warm-up over 5 % of `num_steps`, then cosine decay
    to 1 % of `learning_rate` (small models at the CPU preset's short budget end lower with it)."""
    if schedule == "constant":
        return optax.constant_schedule(learning_rate)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, num_steps // 20), max(2, num_steps),
                                                  end_value=0.01 * learning_rate)
    raise ValueError(f"learning_rate_schedule: `schedule` must be one of {LR_SCHEDULES}; got {schedule!r}")


def init_state(model: InContextRegressor, key, d: int, learning_rate, n_points: int = 4):
    """A TrainState with Adam (Garg et al.: Adam, 1e-4; `learning_rate` may be an optax schedule) and
    freshly initialised parameters."""
    xs, ys = jnp.zeros((1, n_points, d)), jnp.zeros((1, n_points))
    params = nn.meta.unbox(jax.jit(model.init)(key, xs, ys)["params"])
    return create_train_state(model.apply, params, optax.adam(learning_rate))


def model_errors(model, params, xs, ys, task: str, d: int, k: int = 3, x_scale: float = 1.0) -> np.ndarray:
    """Normalised squared error (n,) of the model at every position (1 = predicting 0)."""
    preds = jax.jit(model.apply)({"params": params}, xs, ys)
    return squared_error(np.asarray(preds), np.asarray(ys), task, d, k, x_scale)


def seed_state(stacked, i: int):
    """Seed i's TrainState out of `train_seeds`' stacked one (every leaf's leading axis is the seed)."""
    return jax.tree_util.tree_map(lambda x: x[i], stacked)


def train_seeds(model: InContextRegressor, *, seeds: Sequence[int], task: str, d: int, num_steps: int,
                batch_size: int, dims: Curriculum, points: Curriculum, learning_rate: float = 1e-4,
                lr_schedule: str = "constant", log_every: int = 50, progress: bool = True,
                task_kwargs: Optional[Dict] = None, name: str = "icl"):
    """Train one model per seed, all in one vmapped step (one compilation per prompt length).

    Seed s's run is what a lone run of seed s would be: parameters from ``fold_in(PRNGKey(s), INIT_STREAM)``,
    step t's prompts from ``fold_in(PRNGKey(s), t)``. Returns (state, histories): a TrainState whose leaves
    have a leading seed axis (`seed_state` takes one out) and, per seed, a list of {step, loss, dims, points}
    (the mean training loss over the last `log_every` steps).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_seeds: `seeds` must name at least one seed")
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    tx = optax.adam(learning_rate_schedule(learning_rate, lr_schedule, num_steps))
    example_xs, example_ys = jnp.zeros((1, 4, d)), jnp.zeros((1, 4))

    def init(key):
        params = nn.meta.unbox(model.init(jax.random.fold_in(key, INIT_STREAM), example_xs, example_ys)["params"])
        return create_train_state(model.apply, params, tx)

    state = jax.jit(jax.vmap(init))(keys)
    kwargs = task_kwargs or {}
    sample = jax.jit(jax.vmap(lambda key, step, n_points, d_active: sample_prompts(
        jax.random.fold_in(key, step), task, batch_size, n_points, d, d_active=d_active, **kwargs),
        in_axes=(0, None, None, None)), static_argnums=(2, 3))
    step_fn = jax.jit(jax.vmap(make_train_step(donate=False)), donate_argnums=(0,))
    histories: List[List[Dict]] = [[] for _ in seeds]
    window: List[jax.Array] = []
    bar = tqdm(range(num_steps), desc=f"{name} {task}" + (f" ×{len(seeds)} seeds" if len(seeds) > 1 else ""),
               disable=not progress)
    for step in bar:
        d_active, n_points = dims.value(step), points.value(step)
        xs, ys = sample(keys, step, n_points, d_active)
        state, loss = step_fn(state, xs, ys)
        window.append(loss)
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
            means = np.mean(jax.device_get(window), axis=0)                    # (seeds,)
            for history, mean in zip(histories, means):
                history.append(dict(step=step + 1, loss=float(mean), dims=d_active, points=n_points))
            bar.set_postfix(loss=f"{float(means.mean()):.3f}", dims=d_active, points=n_points)
            window = []
    return state, histories


def train(model: InContextRegressor, *, task: str, d: int, num_steps: int, batch_size: int,
          dims: Curriculum, points: Curriculum, learning_rate: float = 1e-4, lr_schedule: str = "constant",
          seed: int = 0, log_every: int = 50, progress: bool = True, task_kwargs: Optional[Dict] = None,
          name: str = "icl"):
    """One seed of `train_seeds`: returns (state, history: list of {step, loss, dims, points})."""
    state, histories = train_seeds(model, seeds=(seed,), task=task, d=d, num_steps=num_steps,
                                   batch_size=batch_size, dims=dims, points=points, learning_rate=learning_rate,
                                   lr_schedule=lr_schedule, log_every=log_every, progress=progress,
                                   task_kwargs=task_kwargs, name=name)
    return seed_state(state, 0), histories[0]
