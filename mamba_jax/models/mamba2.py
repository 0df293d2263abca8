"""Mamba2LM: embeddings → n_layer × (RMSNorm → Mamba2Mixer, float32 residual) → RMSNorm → tied head."""
from __future__ import annotations

from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.models.lm import DecoderLM


class Mamba2LM(DecoderLM):
    """Mamba-2 language model: `DecoderLM` over a `Mamba2Config` (see DecoderLM for the arguments)."""

    config: Mamba2Config
    config_type = Mamba2Config
