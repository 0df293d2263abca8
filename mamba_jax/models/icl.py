"""In-context regression (Garg et al. 2022; Grazzi et al. 2024) on any decoder backbone.

    prompt  x_1, (y_1, 0, …, 0), x_2, (y_2, 0, …), …      (2n tokens of width d)
    → read_in (Dense d → d_model) → backbone (DecoderLM with head=False: Mamba, Mamba-2, Transformer or
    hybrid layers) → final RMSNorm → read_out (Dense d_model → 1), read at the x tokens:
    prediction i is the model's estimate of y_i from x_1, y_1, …, x_{i−1}, y_{i−1}, x_i.

Probing (Grazzi et al.'s "logit lens"): `return_layer_predictions=True` also sends the residual stream
after the read-in and after every layer through the same final norm and read-out.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.axes import EMBED
from mamba_jax.layers.config import BaseLMConfig
from mamba_jax.layers.norm import RMSNorm
from mamba_jax.models.lm import DecoderLM
from mamba_jax.ops._checks import check_array


def interleave(xs: jax.Array, ys: jax.Array) -> jax.Array:
    """(b, n, d) xs and (b, n) ys -> (b, 2n, d) prompt ``[x_1, (y_1, 0, ..., 0), x_2, (y_2, 0, ...), ...]``."""
    if xs.ndim != 3 or ys.shape != xs.shape[:2]:
        raise ValueError(f"interleave: `xs` must be (b, n, d) and `ys` (b, n); got {xs.shape}, {ys.shape}")
    y_rows = jnp.zeros_like(xs).at[..., 0].set(ys.astype(xs.dtype))
    b, n, d = xs.shape
    return jnp.stack([xs, y_rows], axis=2).reshape(b, 2 * n, d)


class InContextRegressor(nn.Module):
    """Predict y_i from the prompt before it. xs: (b, n, d), ys: (b, n) -> predictions (b, n) float32.

    config: any family config (MambaConfig, Mamba2Config, TransformerConfig — the papers' code (HF GPT-2)
    has position_embedding="learned"; "none" is the position-free variant — or HybridConfig); its
    vocabulary fields are unused.
    With `return_layer_predictions`, returns (predictions, layer_predictions (n_layer + 1, b, n)), the
    last row equal to `predictions`.
    """

    config: BaseLMConfig

    @nn.compact
    def __call__(self, xs, ys, *, return_layer_predictions: bool = False):
        cfg = self.config
        check_array("InContextRegressor", "xs", xs, ("b", "n", "d"))
        check_array("InContextRegressor", "ys", ys, xs.shape[:2])
        tokens = interleave(xs.astype(cfg.jnp_dtype), ys.astype(cfg.jnp_dtype))
        h = nn.Dense(cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name="read_in",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, EMBED)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)))(tokens)
        out = DecoderLM(cfg, head=False, name="backbone").forward(inputs_embeds=h, return_hidden_states=True)
        norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, name="norm_f")
        read_out = nn.Dense(1, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name="read_out",
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (EMBED, None)),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

        def predict(hidden):  # (b, 2n, d_model) -> (b, n) at the x tokens
            return read_out(norm(hidden).astype(cfg.jnp_dtype))[:, ::2, 0].astype(jnp.float32)

        if not return_layer_predictions:
            return predict(out.hidden_states[-1])
        layers = jnp.stack([predict(hidden) for hidden in out.hidden_states])
        return layers[-1], layers
