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
