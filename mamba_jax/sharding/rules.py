"""Strategies as rules tables, and the mapping logical axes -> `NamedSharding`s of parameters and batches.

A rules table is a tuple of ``(logical axis name, mesh axes)`` pairs; mesh axes are a mesh axis name,
a tuple of names (the dimension is split over their product) or None (replicated). The first rule of
a logical name wins. Mesh axes the mesh does not have count as size 1.

Every dimension that a rule maps to mesh axes of total size > 1 must be divisible by that size: a
dimension that is not is a ValueError naming the parameter, the dimension, the logical axis, the model
config keys that set it and the `MeshConfig` keys — nothing is silently replicated. The one exception is
the FSDP fallback (`fsdp_fallback=True`, on by default for the "fsdp" strategies): a parameter with no
`embed` dimension (conv kernel, A_log, D, dt_proj, x_proj) is sharded over `fsdp` on its largest
dimension that is divisible by the fsdp size, and stays replicated when it has none (small vectors).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import NamedSharding, PartitionSpec

from mamba_jax.axes import (BATCH, BATCH_MESH_AXES, CONV, DEFAULT_RULES, EMBED, EXPERT, HEADS, KV_HEADS, LENGTH, MLP,
                            STATE, VOCAB)
from mamba_jax.pytree import path_names

Rules = Tuple[Tuple[str, Any], ...]

# The batch is also split over `expert`: with expert parallelism the devices of one expert group hold
# different sequences (MaxText/GShard style) and exchange tokens only inside the MoE layers.
# pure data parallel: every parameter replicated, the batch split over `data` (and `expert`)
DP_RULES: Rules = (
    (BATCH, ("data", "expert")), (LENGTH, None), (EMBED, None), (MLP, None), (HEADS, None), (KV_HEADS, None),
    (STATE, None), (EXPERT, "expert"), (VOCAB, None), (CONV, None),
)
# ZeRO-3 style: parameters (and so gradients and optimiser state) split over `fsdp` on their embed
# dimension, the batch over (data, fsdp); the forward all-gathers each weight where it is used
FSDP_RULES: Rules = (
    (BATCH, BATCH_MESH_AXES), (LENGTH, None), (EMBED, "fsdp"), (MLP, None), (HEADS, None), (KV_HEADS, None),
    (STATE, None), (EXPERT, "expert"), (VOCAB, None), (CONV, None),
)
# Megatron style: the Mamba inner dimension (d_inner, logical `mlp`), attention heads and the vocabulary
# split over `tensor`; in_proj/dt_proj are column-parallel, x_proj/out_proj row-parallel, and the conv,
# A_log, D and the scan itself act per channel, so each device scans its own d_inner slice. The batch
# goes over (data, fsdp).
TENSOR_RULES: Rules = (
    (BATCH, BATCH_MESH_AXES), (LENGTH, None), (EMBED, None), (MLP, "tensor"), (HEADS, "tensor"),
    (KV_HEADS, "tensor"), (STATE, None), (EXPERT, "expert"), (VOCAB, "tensor"), (CONV, None),
)

STRATEGIES: Dict[str, Rules] = {
    "dp": DP_RULES,
    "fsdp": FSDP_RULES,
    "tensor": TENSOR_RULES,
    "fsdp_tensor": tuple(DEFAULT_RULES),   # both: embed over fsdp, mlp/heads/vocab over tensor
}
FSDP_FALLBACK_STRATEGIES = frozenset({"fsdp", "fsdp_tensor"})

# which model config keys set the size of a logical axis (for error messages)
CONFIG_KEYS = {
    EMBED: "d_model",
    MLP: "d_inner = expand·d_model (Mamba), d_intermediate (MLP) or the inner width of the mixer",
    HEADS: "n_heads / num_heads (Mamba-2: n_heads = d_inner / head_dim)",
    KV_HEADS: "n_kv_heads (grouped-query attention)",
    VOCAB: "vocab_size padded to pad_vocab_size_multiple",
    STATE: "d_state",
    EXPERT: "n_experts",
    CONV: "d_conv",
    BATCH: "the batch size",
    LENGTH: "the sequence length",
}


def strategy_rules(strategy: Union[str, Sequence]) -> Rules:
    """The rules table of a strategy name ("dp", "fsdp", "tensor", "fsdp_tensor"), or a table as given."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of {sorted(STRATEGIES)} "
                             f"or a rules table of (logical name, mesh axes) pairs")
        return STRATEGIES[strategy]
    rules = tuple((name, axes) for name, axes in strategy)
    return rules


def _as_tuple(axes) -> Tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _rule_lookup(rules: Rules) -> Dict[str, Tuple[str, ...]]:
    table: Dict[str, Tuple[str, ...]] = {}
    for name, axes in rules:
        table.setdefault(name, _as_tuple(axes))
    return table


def _axis_size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _describe_axes(mesh, axes: Sequence[str]) -> str:
    return "·".join(f"`{a}`={mesh.shape[a]}" for a in axes)


def _path_str(path) -> str:
    return "/".join(path_names(path))


def logical_to_spec(logical, shape, mesh, rules: Rules, *, name: str = "array",
                    fsdp_fallback: bool = False) -> PartitionSpec:
    """The mesh PartitionSpec of one array from its logical axis names.

    logical: a sequence of logical names (or None) per dimension, shorter ones padded with None;
    shape: the array's shape. A mesh axis is used at most once per array (a later dimension mapped to
    an axis already used stays replicated, as in flax). ValueError when a mapped dimension is not
    divisible by its mesh axes' size (the message names `name`, the dimension and the config keys).
    """
    logical = tuple(logical or ())
    if len(logical) > len(shape):
        raise ValueError(f"{name}: {len(logical)} logical axes {logical} for an array of shape {tuple(shape)}")
    logical = logical + (None,) * (len(shape) - len(logical))
    table = _rule_lookup(rules)
    used, spec = set(), []
    for dim, (lname, size) in enumerate(zip(logical, shape)):
        axes = tuple(a for a in table.get(lname, ()) if a in mesh.shape and a not in used) if lname else ()
        if _axis_size(mesh, axes) == 1:
            spec.append(None)
            continue
        if size % _axis_size(mesh, axes):
            raise ValueError(
                f"{name}: dimension {dim} (logical axis {lname!r}, size {size}, set by the model config's "
                f"{CONFIG_KEYS.get(lname, lname)}) is not divisible by mesh axes {_describe_axes(mesh, axes)} "
                f"(MeshConfig keys {', '.join(repr(a) for a in axes)}); change the model size or the mesh, "
                f"or map {lname!r} to None in the rules to replicate it")
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    if fsdp_fallback and "fsdp" in mesh.shape and mesh.shape["fsdp"] > 1 and "fsdp" not in used:
        n = mesh.shape["fsdp"]
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n == 0]
        if free:
            d = max(free, key=lambda i: (shape[i], -i))
            spec[d] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec) or x is None


def logical_to_shardings(logical_axes, shapes, mesh, rules: Union[str, Rules] = DEFAULT_RULES, *,
                         fsdp_fallback: Optional[bool] = None):
    """A NamedSharding per array of `shapes` from its logical axis names (`logical_to_spec`).

    logical_axes: the tree `mamba_jax.models.param_axes(model)` returns (PartitionSpecs of logical
    names); shapes: a tree of the same structure whose leaves have `.shape` (arrays or
    `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`); rules: a strategy name or rules table;
    fsdp_fallback: default True for the "fsdp"/"fsdp_tensor" strategy names, else False.
    """
    if fsdp_fallback is None:
        fsdp_fallback = isinstance(rules, str) and rules in FSDP_FALLBACK_STRATEGIES
    table = strategy_rules(rules)
    flat_axes, treedef = jax.tree_util.tree_flatten(logical_axes, is_leaf=_is_spec)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    if len(flat_axes) != len(flat_shapes):
        raise ValueError(f"logical_to_shardings: `logical_axes` has {len(flat_axes)} leaves but `shapes` has "
                         f"{len(flat_shapes)}; pass trees of the same structure")
    out = [NamedSharding(mesh, logical_to_spec(tuple(ax) if ax is not None else (), leaf.shape, mesh, table,
                                               name=f"parameter {_path_str(path)!r}",
                                               fsdp_fallback=fsdp_fallback))
           for ax, (path, leaf) in zip(flat_axes, flat_shapes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_axes(mesh, rules: Union[str, Rules] = DEFAULT_RULES) -> Tuple[str, ...]:
    """The mesh axes the batch dimension is split over (the `batch` rule, restricted to the mesh)."""
    return tuple(a for a in _rule_lookup(strategy_rules(rules)).get(BATCH, ()) if a in mesh.shape)


def batch_sharding(mesh, rules: Union[str, Rules] = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding of a (b, ...) input: the batch dimension over the `batch` rule's mesh axes."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch(batch, mesh, rules: Union[str, Rules] = DEFAULT_RULES) -> None:
    """ValueError unless every array of `batch` has a leading dimension divisible by the data axes."""
    axes = batch_axes(mesh, rules)
    n = _axis_size(mesh, axes)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = getattr(leaf, "shape", ())
        if not shape:
            raise ValueError(f"batch {_path_str(path)!r}: a scalar has no batch dimension to shard")
        if shape[0] % n:
            shown = tuple(a for a in axes if mesh.shape[a] > 1) or axes   # size-1 axes are noise here
            raise ValueError(
                f"batch {_path_str(path)!r}: the batch size {shape[0]} is not divisible by the data-parallel "
                f"mesh axes {_describe_axes(mesh, shown)} (MeshConfig keys {', '.join(repr(a) for a in shown)}; "
                f"product {n}); use a batch size that is a multiple of {n}")


def shard_batch(batch, mesh, rules: Union[str, Rules] = DEFAULT_RULES):
    """`batch` (a pytree of (b, ...) arrays) checked (`check_batch`) and placed batch-sharded on `mesh`."""
    check_batch(batch, mesh, rules)
    return jax.device_put(batch, batch_sharding(mesh, rules))


def replicated(mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())
