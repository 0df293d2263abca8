"""Parameter initialisers shared by the layers (official Mamba / torch defaults)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.layers.config import BaseLMConfig


def torch_linear_init(scale: float = 1.0):
    """torch.nn.Linear's default U(±1/sqrt(fan_in)), times `scale`."""
    return nn.initializers.variance_scaling(scale ** 2 / 3.0, "fan_in", "uniform")


def uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
    """Inverse softplus of dt ~ exp(U[log dt_min, log dt_max]), floored at dt_init_floor."""
    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A_log[c, i] = log(i + 1), so A = -exp(A_log) = -(1..n) for every channel."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def logical_param(module, name, init, axes, shape, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def residual_out_scale(config: BaseLMConfig) -> float:
    """The official rescaling of the output projections: 1/sqrt(residual branches per layer · n_layer)."""
    return 1.0 / math.sqrt(config.n_layer * (2 if config.d_intermediate else 1))
