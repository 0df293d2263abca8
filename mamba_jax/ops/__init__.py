"""Pure jnp functions (no Flax): scans, convolutions, norms."""
from mamba_jax.ops.attention import (attention_mask, cached_attention, causal_attention, dot_product_attention,
                                    rotary_embedding, segment_ids, shared_kv_attention)
from mamba_jax.ops.conv import causal_conv1d, conv_state_steps
from mamba_jax.ops.moe import (DISPATCHES, ROUTERS, Routing, expert_capacity, expert_ffn, load_balancing_loss,
                               mixture_of_experts, mixture_of_experts_dropless, route, router_jitter,
                               router_z_loss)
from mamba_jax.ops.norms import gated_rms_norm, rms_norm
from mamba_jax.ops.selective_scan import (IMPLS, resolve_impl, selective_scan, selective_state_steps,
                                         selective_state_update)
from mamba_jax.ops.ssd import SSD_IMPLS, resolve_ssd_impl, segsum, ssd

__all__ = ["DISPATCHES", "IMPLS", "ROUTERS", "Routing", "SSD_IMPLS", "attention_mask", "cached_attention", "causal_attention", "causal_conv1d", "conv_state_steps",
           "dot_product_attention", "expert_capacity", "expert_ffn", "gated_rms_norm", "load_balancing_loss",
           "mixture_of_experts", "mixture_of_experts_dropless", "resolve_impl", "resolve_ssd_impl", "rms_norm", "rotary_embedding", "route", "router_jitter",
           "router_z_loss", "segment_ids", "segsum", "selective_scan", "selective_state_steps", "selective_state_update", "shared_kv_attention", "ssd"]
