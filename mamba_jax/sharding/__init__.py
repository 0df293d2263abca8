"""Meshes, the rules that map logical axis names (`mamba_jax.axes`) to mesh axes, and the per-shard wrappers
(`shard_map`) around kernels and experts. Below the layers: it knows nothing of models or training
(sharded training is `mamba_jax.train.sharded`).

Modules annotate parameters with the logical names of `mamba_jax.axes` (``nn.with_logical_partitioning``);
only this package maps them to mesh axes.

The one sharding model: meshes with **Auto** axes (`make_mesh`, `make_mesh_from_config(MeshConfig(...))`,
axes "data", "fsdp", "tensor", "expert") and `jax.jit(..., in_shardings=..., out_shardings=...)` (what
`pjit` became) — GSPMD propagates the shardings through the unmodified modules, no mesh context needed.

    mesh = make_mesh_from_config(MeshConfig(data=2, fsdp=4))
    tr = sharded_training(model, make_optimizer(cfg), mesh, "fsdp")   # mamba_jax.train; "dp" | "fsdp" | "tensor" | ...
    state = tr.init_state(jax.random.PRNGKey(0))                       # created sharded
    state, metrics = tr.train_step(state, batch)                       # metrics replicated
    state, meta = Checkpointer(path).restore(tr.abstract_state)        # any saved device count

Strategies are rules tables (`STRATEGIES`, in `rules.py`); `logical_to_shardings` maps `param_axes(model)`
through one, raising a ValueError that names the parameter, dimension and config keys when a dimension
does not divide its mesh axes. Multi-process runs: `mamba_jax.sharding.distributed` (initialize, global_batch, process_shard).
"""
from __future__ import annotations

from mamba_jax.axes import (BATCH, CONV, DEFAULT_RULES, EMBED, EXPERT, HEADS, KV_HEADS, LENGTH,  # noqa: F401
                            MLP, STATE, VOCAB)


def make_mesh(axis_shapes, axis_names, devices=None):
    """A device mesh with **Auto** axes (classic GSPMD), the one sharding model of this project.

    `jax.make_mesh` in jax ≥ 0.10 makes Explicit axes, under which e.g. an embedding gather on
    batch-sharded ids needs an explicit `out_sharding`; with Auto axes `jax.jit(..., in_shardings=...,
    out_shardings=...)` works on the unmodified modules and needs no mesh context.

    axis_shapes: sizes, e.g. (2, 4); axis_names: names, e.g. ("data", "tensor"); devices: default
    `jax.devices()` (the first prod(axis_shapes) are used).
    """
    import math

    import jax
    import numpy as np

    axis_shapes, axis_names = tuple(axis_shapes), tuple(axis_names)
    if len(axis_shapes) != len(axis_names):
        raise ValueError(f"make_mesh: `axis_shapes` {axis_shapes} and `axis_names` {axis_names} differ in length")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(axis_shapes)
    if needed > len(devices):
        raise ValueError(f"make_mesh: mesh {axis_shapes} needs {needed} devices; {len(devices)} available")
    return jax.sharding.Mesh(np.asarray(devices[:needed]).reshape(axis_shapes), axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names))


from mamba_jax.sharding.mesh import MESH_AXES, MeshConfig, make_mesh_from_config  # noqa: E402
from mamba_jax.sharding.rules import (  # noqa: E402
    DP_RULES,
    FSDP_RULES,
    STRATEGIES,
    TENSOR_RULES,
    batch_axes,
    batch_sharding,
    check_batch,
    logical_to_shardings,
    logical_to_spec,
    replicated,
    shard_batch,
    strategy_rules,
)

__all__ = ["BATCH", "CONV", "DEFAULT_RULES", "DP_RULES", "EMBED", "EXPERT", "FSDP_RULES", "HEADS", "KV_HEADS", "LENGTH",
           "MESH_AXES", "MLP", "MeshConfig", "STATE", "STRATEGIES", "TENSOR_RULES", "VOCAB", "batch_axes",
           "batch_sharding", "check_batch", "logical_to_shardings", "logical_to_spec", "make_mesh",
           "make_mesh_from_config", "replicated", "shard_batch", "strategy_rules"]


def __getattr__(name):
    # Multi-process helpers (`jax.distributed`): `mamba_jax.sharding.distributed`, loaded on first use.
    if name == "distributed":
        import importlib
        return importlib.import_module("mamba_jax.sharding.distributed")
    raise AttributeError(f"module 'mamba_jax.sharding' has no attribute {name!r}")


__all__.append("distributed")
