"""Language models: one decoder shell (`DecoderLM`) over the Mamba-1, Mamba-2, attention mixers."""
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.models.hybrid import HybridConfig, HybridLM, parse_pattern
from mamba_jax.models.lm import (DecoderBlock, DecoderLM, LMOutput, ModelCache, init_cache, init_params,
                                 param_axes, token_positions)
from mamba_jax.models.mamba import MambaCache, MambaLM
from mamba_jax.models.mamba2 import Mamba2LM
from mamba_jax.models.sizes import MAMBA_SIZES, mamba_config
from mamba_jax.models.transformer import TransformerLM

__all__ = ["DecoderBlock", "DecoderLM", "HybridConfig", "HybridLM", "LMOutput", "MAMBA_SIZES", "Mamba2Config", "Mamba2LM",
           "MambaCache", "MambaConfig", "MambaLM", "ModelCache", "TransformerConfig", "TransformerLM",
           "init_cache", "init_params", "mamba_config", "param_axes", "parse_pattern", "token_positions"]
from mamba_jax.models.classifier import ClassifierConfig, MambaClassifier, count_params, image_tokens, init_classifier

__all__ += ["ClassifierConfig", "MambaClassifier", "count_params", "image_tokens", "init_classifier"]
