"""mamba-jax: selective state-space models (Mamba, Mamba-2), Transformers and hybrids in JAX/Flax.

Layout: `ops` (pure functions: selective_scan, ssd, causal_conv1d, norms, attention) ← `layers` (family
configs, Flax mixers) ← `models` (DecoderLM: MambaLM, Mamba2LM, TransformerLM, HybridLM) ← `inference`
(prefill/step/generate), `train`, `interop` (HF and official checkpoints).
"""
__version__ = "0.1.0"
