"""TransformerLM: a Llama-style decoder (RMSNorm, GQA attention with rotary positions, SwiGLU MLP)."""
from __future__ import annotations

from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.models.lm import DecoderLM


class TransformerLM(DecoderLM):
    """Llama-style Transformer: `DecoderLM` over a `TransformerConfig` (see DecoderLM for the arguments).

    Decoding uses a KV cache preallocated to `max_len` (`init_cache(config, b, max_len)`).
    """

    config: TransformerConfig
    config_type = TransformerConfig
