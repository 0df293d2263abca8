"""Optimiser: AdamW with a warmup + cosine (or linear) decay schedule, global-norm clipping and a
weight-decay mask.

As in the official Mamba training recipe, no weight decay goes to A_log, D, any norm weight or any bias.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import optax

from mamba_jax.pytree import path_names  # noqa: F401 (re-exported: mamba_jax.train.path_names)

NO_DECAY_LEAF_NAMES = frozenset({"A_log", "D"})
LR_SCHEDULES = ("cosine", "linear")


def decays(names: Sequence[str]) -> bool:
    """Whether the parameter at `names` (its path in the param tree) gets weight decay.

    False for: A_log and D (SSM parameters), biases (a leaf named `bias` or ending in `_bias`:
    Dense bias, conv1d_bias, dt_proj_bias, Mamba-2's dt_bias), and every parameter of a norm (any path
    component containing "norm": `norm`, `norm_f`, RMSNorm_0, LayerNorm_0, ...). True otherwise
    (Dense/conv kernels, dt_proj_kernel, embeddings).
    """
    leaf = names[-1]
    if leaf in NO_DECAY_LEAF_NAMES or leaf == "bias" or leaf.endswith("_bias"):
        return False
    return not any("norm" in name.lower() for name in names)


def weight_decay_mask(params):
    """A pytree of bools with the structure of `params`: True where weight decay applies (see `decays`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_names(path)), params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + warmup/decay schedule + clipping hyper-parameters.

    The learning rate rises linearly from 0 to `learning_rate` over `warmup_steps`, then decays down to
    `learning_rate * end_lr_ratio` at `total_steps` (and stays there): along a cosine
    (`lr_schedule="cosine"`) or a straight line (`"linear"`). Steps are optimizer steps (with gradient
    accumulation inside the train step, one per train step).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0
    lr_schedule: str = "cosine"

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"OptimizerConfig: `lr_schedule` must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig: `learning_rate` must be > 0; got {self.learning_rate!r}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"OptimizerConfig: `total_steps` must be a positive int; got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"OptimizerConfig: `warmup_steps` must be an int in [0, total_steps="
                             f"{self.total_steps}); got {self.warmup_steps!r}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig: `end_lr_ratio` must be in [0, 1]; got {self.end_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig: `weight_decay` must be >= 0; got {self.weight_decay!r}")
        if not self.grad_clip_norm > 0:
            raise ValueError(f"OptimizerConfig: `grad_clip_norm` must be > 0; got {self.grad_clip_norm!r}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate: linear warmup from 0 over `warmup_steps`, then cosine or linear decay
    (`config.lr_schedule`) to learning_rate · end_lr_ratio at `total_steps`."""
    peak, end = config.learning_rate, config.learning_rate * config.end_lr_ratio
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=config.warmup_steps,
                                                  decay_steps=config.total_steps, end_value=end)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, config.warmup_steps),
         optax.linear_schedule(peak, end, config.total_steps - config.warmup_steps)],
        boundaries=[config.warmup_steps])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip_norm) → AdamW(schedule, weight decay masked by `weight_decay_mask`)."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=weight_decay_mask),
    )
