"""Pure jnp functions (no Flax): scans, convolutions, norms."""
from mamba_jax.ops.attention import attention_mask, dot_product_attention, rotary_embedding, segment_ids
from mamba_jax.ops.conv import causal_conv1d
from mamba_jax.ops.norms import gated_rms_norm, rms_norm
from mamba_jax.ops.selective_scan import IMPLS, resolve_impl, selective_scan, selective_state_update
from mamba_jax.ops.ssd import SSD_IMPLS, segsum, ssd

__all__ = ["IMPLS", "SSD_IMPLS", "attention_mask", "causal_conv1d", "dot_product_attention", "rotary_embedding",
           "segment_ids", "gated_rms_norm", "resolve_impl", "rms_norm", "segsum", "selective_scan",
           "selective_state_update", "ssd"]
