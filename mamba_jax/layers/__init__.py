"""Thin Flax Linen modules over `mamba_jax.ops`."""
from mamba_jax.layers.mamba import LayerCache, MambaConfig, MambaMixer, init_layer_cache
from mamba_jax.layers.norm import RMSNorm

__all__ = ["LayerCache", "MambaConfig", "MambaMixer", "RMSNorm", "init_layer_cache"]
