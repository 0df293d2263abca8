"""Pallas kernels (GPU and TPU) for the selective scan and SSD — one folder per kernel.

Depends on jax only; `mamba_jax.ops` dispatches here lazily with `impl="pallas"`. The kernels are
still to land; until then `impl="pallas"` raises a clear ValueError.
"""
