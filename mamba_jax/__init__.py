"""mamba-jax: selective state-space models (Mamba) in JAX/Flax.

Layout: `ops` (pure functions: selective_scan, causal_conv1d, rms_norm) ← `layers` (Flax modules) ←
`models` (MambaLM) ← `inference` (prefill/step/generate), `train`, `interop` (HF checkpoints).
"""
__version__ = "0.1.0"
