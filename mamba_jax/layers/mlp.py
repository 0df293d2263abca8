"""The SwiGLU MLP of Llama (and of Mamba blocks with `d_intermediate` > 0)."""
from __future__ import annotations

import flax.linen as nn
import jax

from mamba_jax.layers.config import BaseLMConfig
from mamba_jax.layers.init import residual_out_scale, torch_linear_init
from mamba_jax.axes import EMBED, MLP


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) · up_proj(x)).  x: (..., d_model) -> (..., d_model).

    Width `config.mlp_width`; names as HF's LlamaMLP. down_proj is initialised with the official
    residual rescaling (see `residual_out_scale`).
    """

    config: BaseLMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, axes, name, scale=1.0: nn.Dense(
            features, use_bias=cfg.mlp_bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(torch_linear_init(scale), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
        gate = dense(cfg.mlp_width, (EMBED, MLP), "gate_proj")(x)
        up = dense(cfg.mlp_width, (EMBED, MLP), "up_proj")(x)
        return dense(cfg.d_model, (MLP, EMBED), "down_proj", residual_out_scale(cfg))(jax.nn.silu(gate) * up)
