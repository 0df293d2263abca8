"""Teacher–student training: a jitted KD step with a frozen teacher, and optimisers that train a subset.

    step = make_kd_train_step(teacher.apply, KDConfig(kind="forward_kl", w_kl=0.1, w_ce=1.0))
    state = create_train_state(student.apply, student_params, freeze_except(make_optimizer(cfg), mask))
    state, metrics = step(state, teacher_params, batch)

The teacher's parameters are an argument (not a closure), so they can be sharded like any input under
`jax.jit(..., in_shardings=...)`, and never receive gradients (`stop_gradient`; the teacher runs in
inference mode: no dropout exists in these models, and no cache). With ``teacher_dtype="bfloat16"`` the
teacher's parameters are cast before its forward. A batch may instead carry stored teacher outputs
``teacher_topk_logits`` / ``teacher_topk_indices`` (b, l, k): then no teacher forward runs at all.

Batches: ``inputs`` (b, l) int, ``targets`` (b, l) int (the labels of the CE term), ``loss_mask`` (b, l),
optional ``seq_idx`` (b, l).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from mamba_jax.distill.losses import KL_KINDS, kd_loss
from mamba_jax.train.step import TrainState, forward

TEACHER_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """The distillation loss of a step: ``w_kl · D(teacher ‖ student) + w_ce · CE(student, targets)``.

    kind: "forward_kl" (MambaInLlama), "reverse_kl" (M1 stage 2), "jsd" (with `beta`).
    temperature: T of both softmaxes in D; scale_by_temperature_squared: multiply D by T² (Hinton).
    teacher_dtype: the dtype the teacher's parameters are cast to for its forward.
    """

    kind: str = "forward_kl"
    w_kl: float = 1.0
    w_ce: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    scale_by_temperature_squared: bool = False
    teacher_dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in KL_KINDS:
            raise ValueError(f"KDConfig: `kind` must be one of {KL_KINDS}; got {self.kind!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"KDConfig: `teacher_dtype` must be one of {TEACHER_DTYPES}; got {self.teacher_dtype!r}")
        for name in ("w_kl", "w_ce"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"KDConfig: `{name}` must be a number >= 0; got {value!r}")
        if self.w_kl == 0 and self.w_ce == 0:
            raise ValueError("KDConfig: `w_kl` and `w_ce` are both 0: nothing to train on")


# The two stages as the papers ran them: MambaInLlama's stage 1 trains only the new mixers on forward KL
# (0.1) + CE (1.0); M1's stage 2 trains the whole student end to end on reverse KL (weight 1, T = 1).
STAGE1_KD = KDConfig(kind="forward_kl", w_kl=0.1, w_ce=1.0)
STAGE2_KD = KDConfig(kind="reverse_kl", w_kl=1.0, w_ce=0.0, temperature=1.0)


def start_stage2(stage1_state: TrainState, tx: optax.GradientTransformation) -> TrainState:
    """The student of stage 1, trained end to end from here: its parameters (as they are, frozen or not)
    under a fresh optimiser `tx` over every parameter, the step count carried on. Pair it with
    ``make_kd_train_step(teacher_apply, STAGE2_KD)``."""
    fresh = TrainState.create(apply_fn=stage1_state.apply_fn, params=stage1_state.params, tx=tx)
    return fresh.replace(step=stage1_state.step)


def teacher_logits(teacher_apply: Callable, teacher_params, batch: Dict[str, Any], dtype: str = "float32"):
    """The frozen teacher's logits (b, l, V) for `batch` (no gradient flows into `teacher_params`)."""
    params = jax.lax.stop_gradient(teacher_params)
    if dtype != "float32":
        params = jax.tree_util.tree_map(
            lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    return jax.lax.stop_gradient(forward(teacher_apply, params, batch))


def kd_batch_loss(student_params, apply_fn: Callable, teacher_apply: Optional[Callable], teacher_params,
                  batch: Dict[str, Any], config: KDConfig):
    """(loss, metrics) of the student on one batch: `kd_loss` against the teacher's logits (computed
    here) or against the batch's stored top-k teacher outputs."""
    logits = forward(apply_fn, student_params, batch)
    opts = dict(kind=config.kind, w_kl=config.w_kl, w_ce=config.w_ce, temperature=config.temperature,
                beta=config.beta, mask=batch.get("loss_mask"),
                scale_by_temperature_squared=config.scale_by_temperature_squared)
    if "teacher_topk_logits" in batch:
        return kd_loss(logits, batch["targets"], teacher_topk=(batch["teacher_topk_logits"],
                                                              batch["teacher_topk_indices"]), **opts)
    if teacher_apply is None:
        raise ValueError("kd_batch_loss: no `teacher_apply` and no stored `teacher_topk_logits` in the batch")
    t_logits = teacher_logits(teacher_apply, teacher_params, batch, config.teacher_dtype)
    return kd_loss(logits, batch["targets"], teacher_logits=t_logits.astype(jnp.float32), **opts)


def make_kd_train_step(teacher_apply: Optional[Callable], config: KDConfig = KDConfig(), *, donate: bool = True):
    """A jitted ``(state, teacher_params, batch) -> (state, metrics)``.

    state: a flax TrainState of the student (`create_train_state`); teacher_params: the teacher's
    params (None with stored top-k outputs in the batch). metrics: loss, kl, ce, accuracy, grad_norm.
    """

    def step(state: TrainState, teacher_params, batch):
        def loss_fn(params):
            return kd_batch_loss(params, state.apply_fn, teacher_apply, teacher_params, batch, config)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return state.apply_gradients(grads=grads), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_kd_eval_step(apply_fn: Callable, teacher_apply: Optional[Callable], config: KDConfig = KDConfig()):
    """A jitted ``(params, teacher_params, batch) -> metrics`` of the student `apply_fn`, with the
    train step's loss (loss, kl, ce, accuracy)."""

    @jax.jit
    def eval_step(params, teacher_params, batch):
        return kd_batch_loss(params, apply_fn, teacher_apply, teacher_params, batch, config)[1]

    return eval_step


def freeze_except(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """`tx` on the parameters where the bool pytree `trainable` is True; the others keep their values
    (zero updates, no optimiser state). E.g. stage 1 of MambaInLlama: ``trainable =
    new_mixer_mask(config, params)``."""
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
