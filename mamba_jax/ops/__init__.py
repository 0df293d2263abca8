"""Pure jnp functions (no Flax): scans, convolutions, norms."""
from mamba_jax.ops.conv import causal_conv1d
from mamba_jax.ops.norms import rms_norm
from mamba_jax.ops.selective_scan import IMPLS, resolve_impl, selective_scan, selective_state_update

__all__ = ["IMPLS", "causal_conv1d", "resolve_impl", "rms_norm", "selective_scan", "selective_state_update"]
