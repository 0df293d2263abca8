"""RMSNorm module."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mamba_jax.ops import rms_norm
from mamba_jax.axes import EMBED


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. x: (..., d) -> (..., d), same dtype; weight (d,) starts at 1."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = EMBED

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                            (x.shape[-1],), self.param_dtype)
        return rms_norm(x, weight, self.eps)
