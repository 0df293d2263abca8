"""Sharded training: train state created sharded, and the train/eval steps of `mamba_jax.train.step`
compiled with `jax.jit(..., in_shardings=..., out_shardings=...)` on an Auto-axis mesh.

The optimiser state follows the parameters: every optax state leaf that sits at a parameter's path
(Adam's mu and nu, ...) with the parameter's shape gets that parameter's sharding; everything else
(step counts, schedules' counters, scalars) is replicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mamba_jax.sharding.rules import (
    Rules,
    batch_sharding,
    check_batch,
    logical_to_shardings,
    replicated,
    strategy_rules,
)
from mamba_jax.pytree import path_names
from mamba_jax.sharding.kernels import trace_under_mesh
from mamba_jax.train.step import create_train_state, make_eval_step, make_train_step


def follow_param_shardings(tree, params, param_shardings, mesh):
    """Shardings for `tree` (e.g. an optax state, abstract or concrete) following the parameters.

    A leaf whose key path ends with a parameter's key path and that has the parameter's shape gets the
    parameter's sharding; any other leaf is replicated on `mesh`.
    """
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), s in zip(flat_params, jax.tree_util.tree_leaves(param_shardings)):
        by_path[path_names(path)] = (tuple(p.shape), s)
    repl = replicated(mesh)

    def pick(path, leaf):
        names = path_names(path)
        for k in range(len(names)):
            hit = by_path.get(names[k:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(pick, tree)


def train_state_shardings(abstract_state, param_shardings, mesh):
    """The sharding tree of a TrainState: params as given, opt_state following them, step replicated."""
    return abstract_state.replace(
        step=replicated(mesh), params=param_shardings,
        opt_state=follow_param_shardings(abstract_state.opt_state, abstract_state.params, param_shardings, mesh))


def _model_init_fn(model, seq_len: int):
    def init(rng):
        return nn.meta.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
    return init


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
    """Everything to train one model sharded over one mesh (build it with `sharded_training`).

    Fields: mesh, rules, param_shardings, state_shardings (TrainState tree), batch_sharding,
    abstract_state (a TrainState of `jax.ShapeDtypeStruct`s carrying the shardings: the restore target
    of `Checkpointer.restore`), and the compiled functions:
      init_state(rng) -> TrainState created directly sharded (no full copy on one device);
      train_step(state, batch) -> (state, metrics) — `make_train_step`'s step; the state is donated;
        metrics come back replicated;
      eval_step(params, batch) -> summed stats (`make_eval_step`'s step), replicated.
    `train_step`/`eval_step` check the batch first (ValueError when its size is not divisible by the
    data-parallel axes) and move host or differently-placed arrays onto `batch_sharding`; `.jitted`
    on them is the bare `jax.jit` function (e.g. for `.lower(...)`).
    """

    mesh: Any
    rules: Rules
    param_shardings: Any
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any
    init_state: Callable
    train_step: Callable
    eval_step: Callable

    def shard_batch(self, batch):
        """`batch` checked and placed batch-sharded on the mesh."""
        check_batch(batch, self.mesh, self.rules)
        return jax.device_put(batch, self.batch_sharding)

    def shard_state(self, state):
        """An existing (e.g. unsharded) TrainState moved onto `state_shardings`."""
        return jax.device_put(state, self.state_shardings)


def _with_batch_check(jitted, mesh, rules, sharding, batch_argnum: int):
    def call(*args):
        args = list(args)
        check_batch(args[batch_argnum], mesh, rules)
        args[batch_argnum] = jax.device_put(args[batch_argnum], sharding)
        return jitted(*args)

    call.jitted = jitted
    return call


def sharded_training(model, tx: optax.GradientTransformation, mesh, strategy: Union[str, Rules] = "fsdp", *,
                     learning_rate_fn: Optional[Callable] = None, donate: bool = True, grad_accum_steps: int = 1,
                     logical_axes=None, init_fn: Optional[Callable] = None, seq_len: int = 8,
                     fsdp_fallback: Optional[bool] = None, rng=None) -> ShardedTraining:
    """Shardings and compiled init/train/eval functions for `model` on `mesh` under `strategy`.

    Args:
      model: a `DecoderLM` (MambaLM, ...) — its parameters carry logical axis names.
      tx: the optax optimiser (e.g. `make_optimizer(...)`).
      mesh: an Auto-axis mesh (`make_mesh_from_config(MeshConfig(...))`).
      strategy: "dp", "fsdp", "tensor", "fsdp_tensor", or a rules table.
      learning_rate_fn, donate, grad_accum_steps, rng: as in `make_train_step` (rng: the per-step key of
        the model's training-time noise, e.g. the MoE router jitter).
      logical_axes / init_fn(rng) -> params: override `param_axes(model)` / `model.init` on (1, seq_len)
        zeros (e.g. for models with other inputs).
      fsdp_fallback: see `logical_to_shardings`.
    Raises ValueError (naming the parameter and the config keys) when a sharded dimension does not
    divide its mesh axes.
    """
    rules = strategy_rules(strategy)
    if fsdp_fallback is None:
        fsdp_fallback = isinstance(strategy, str) and strategy in ("fsdp", "fsdp_tensor")
    if logical_axes is None:
        from mamba_jax.models.lm import param_axes
        logical_axes = param_axes(model)
    init_params = init_fn or _model_init_fn(model, seq_len)

    def make_state(rng):
        return create_train_state(model.apply, init_params(rng), tx)

    abstract = jax.eval_shape(make_state, jax.random.PRNGKey(0))
    param_sh = logical_to_shardings(logical_axes, abstract.params, mesh, rules, fsdp_fallback=fsdp_fallback)
    state_sh = train_state_shardings(abstract, param_sh, mesh)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, state_sh)
    batch_sh = batch_sharding(mesh, rules)
    repl = replicated(mesh)

    # traced with the mesh in context, so that Pallas kernels run per shard (`sharding.kernels`)
    init_state = trace_under_mesh(jax.jit(make_state, out_shardings=state_sh), mesh)
    train = trace_under_mesh(jax.jit(make_train_step(learning_rate_fn, donate=False, grad_accum_steps=grad_accum_steps,
                                                     rng=rng),
                                     in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                                     donate_argnums=(0,) if donate else ()), mesh)
    evaluate = trace_under_mesh(jax.jit(make_eval_step(model.apply), in_shardings=(param_sh, batch_sh),
                                        out_shardings=repl), mesh)
    return ShardedTraining(
        mesh=mesh, rules=rules, param_shardings=param_sh, state_shardings=state_sh, batch_sharding=batch_sh,
        abstract_state=abstract, init_state=init_state,
        train_step=_with_batch_check(train, mesh, rules, batch_sh, 1),
        eval_step=_with_batch_check(evaluate, mesh, rules, batch_sh, 1))
