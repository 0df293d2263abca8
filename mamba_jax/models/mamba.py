"""MambaLM: embeddings → n_layer × (RMSNorm → MambaMixer, float32 residual) → RMSNorm → tied head."""
from __future__ import annotations

from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.models.lm import DecoderLM, ModelCache

MambaCache = ModelCache  # the name the foundation used


class MambaLM(DecoderLM):
    """Mamba-1 language model: `DecoderLM` over a `MambaConfig` (see DecoderLM for the arguments)."""

    config: MambaConfig
    config_type = MambaConfig
