"""Logical axis names of parameters and activations, and the default rules that map them to mesh axes.

A leaf module: layers name the axes of what they create (`nn.with_logical_partitioning(init, (EMBED, MLP))`)
by importing these constants, and `mamba_jax.sharding` maps them to a mesh with a rules table. Nothing here
imports the rest of the library.
"""
from __future__ import annotations

BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, STATE, EXPERT, VOCAB, CONV = (
    "batch", "length", "embed", "mlp", "heads", "kv_heads", "state", "expert", "vocab", "conv")

# The mesh axes a batch is split over: every data-parallel axis, `expert` included (with expert parallelism
# the devices of one expert group hold different sequences and exchange tokens only inside MoE layers).
BATCH_MESH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or None: replicated). Data parallel over `data`/`fsdp`, tensor
# parallel over the inner (mlp/heads/vocab) dimension.
DEFAULT_RULES = (
    (BATCH, BATCH_MESH_AXES),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (STATE, None),
    (EXPERT, "expert"),
    (VOCAB, "tensor"),
    (CONV, None),
)
