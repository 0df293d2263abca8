"""Thin Flax Linen modules over `mamba_jax.ops`, and the family configs they are built from."""
from mamba_jax.layers.attention import Attention, KVCache, TransformerConfig, init_kv_cache
from mamba_jax.layers.config import ATTENTION, MAMBA, MAMBA2, MIXER_KINDS, BaseLMConfig
from mamba_jax.layers.mamba import LayerCache, MambaConfig, MambaMixer, init_layer_cache
from mamba_jax.layers.mamba2 import Mamba2Cache, Mamba2Config, Mamba2Mixer, init_mamba2_cache
from mamba_jax.layers.mlp import GatedMLP
from mamba_jax.layers.moe import MoE, MoEConfig
from mamba_jax.layers.norm import RMSNorm

__all__ = ["ATTENTION", "Attention", "BaseLMConfig", "GatedMLP", "KVCache", "LayerCache", "MAMBA", "MAMBA2",
           "MIXER_KINDS", "Mamba2Cache", "Mamba2Config", "Mamba2Mixer", "MambaConfig", "MambaMixer", "MoE",
           "MoEConfig", "RMSNorm", "TransformerConfig", "init_kv_cache", "init_layer_cache", "init_mamba2_cache"]
