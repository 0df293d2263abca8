"""Thin Flax Linen modules over `mamba_jax.ops`, and the family configs they are built from."""
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.config import ATTENTION, MAMBA, MAMBA2, MIXER_KINDS, BaseLMConfig
from mamba_jax.layers.mamba import LayerCache, MambaConfig, MambaMixer, init_layer_cache
from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.layers.mlp import GatedMLP
from mamba_jax.layers.norm import RMSNorm

__all__ = ["ATTENTION", "BaseLMConfig", "GatedMLP", "LayerCache", "MAMBA", "MAMBA2", "MIXER_KINDS", "Mamba2Config",
           "MambaConfig", "MambaMixer", "RMSNorm", "TransformerConfig", "init_layer_cache"]
