"""`mamba-jax bench hf`: throughput of MambaLM vs HF transformers on CPU (see README.md)."""
