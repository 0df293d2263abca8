"""Normalisations, computed in float32 (float64 stays float64)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import compute_dtype


def rms_norm(x, weight, eps: float = 1e-5):
    """x / sqrt(mean(x², -1) + eps) · weight.  x: (..., d), weight: (d,).  Returns the dtype of `x`.

    Matches HF's MambaRMSNorm: normalise in float32, cast back to the input dtype, then scale.
    """
    cd = compute_dtype(x)
    xf = x.astype(cd)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def gated_rms_norm(x, z, weight, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
    """Mamba-2's gated RMSNorm, normalising each group of `group_size` channels separately.

    norm_before_gate=False (Mamba-2's default): rms_norm(x · silu(z)) · weight; True: rms_norm(x) · weight ·
    silu(z). x, z: (..., d) with d divisible by group_size; weight: (d,). Computed in float32 (float64
    stays float64); returns the dtype of `x`.
    """
    d = x.shape[-1]
    if z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: `z` must have the shape of `x` {x.shape}; got {z.shape}")
    if weight.shape != (d,):
        raise ValueError(f"gated_rms_norm: `weight` must have shape ({d},); got {weight.shape}")
    if not isinstance(group_size, int) or group_size < 1 or d % group_size:
        raise ValueError(f"gated_rms_norm: `group_size` must be a positive int dividing d={d}; got {group_size!r}")
    cd = compute_dtype(x, z)
    xf, gate = x.astype(cd), jax.nn.silu(z.astype(cd))
    if not norm_before_gate:
        xf = xf * gate
    grouped = xf.reshape(*xf.shape[:-1], d // group_size, group_size)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    out = grouped.reshape(xf.shape) * weight.astype(cd)
    if norm_before_gate:
        out = out * gate
    return out.astype(x.dtype)
