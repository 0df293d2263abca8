"""Logical axis names for parameters and activations, and the rules that map them to mesh axes.

Modules annotate parameters with the logical names below (``nn.with_logical_partitioning``); only this
package maps them to mesh axes. The scale-out work extends the rules table; nothing else imports
``jax.sharding`` directly.
"""
from __future__ import annotations

BATCH, LENGTH, EMBED, MLP, HEADS, STATE, EXPERT, VOCAB, CONV = (
    "batch", "length", "embed", "mlp", "heads", "state", "expert", "vocab", "conv")

# logical axis -> mesh axis (or None: replicated). Data parallel over `data`/`fsdp`, tensor
# parallel over the inner (mlp/heads/vocab) dimension.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (STATE, None),
    (EXPERT, "expert"),
    (VOCAB, "tensor"),
    (CONV, None),
)


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
