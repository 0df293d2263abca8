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
