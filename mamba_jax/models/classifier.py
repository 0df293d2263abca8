"""A Mamba image classifier (Vim-style, small): pixel-row or patch tokens → Mamba-1 blocks → mean pool → head.

    images (b, H, W) or (b, H, W, C) float
      → tokens: pixel rows (b, H, W·C)            [patch_size = 0]
                or p×p patches (b, (H/p)(W/p), p·p·C)  [patch_size = p]
      → linear token embedding + learned positions (b, L, d_model)
      → n_layer × { h += mixer(RMSNorm(h)) [+ flip(mixer_rev(flip(RMSNorm(h)))) when bidirectional] }
      → RMSNorm → mean over the L tokens (b, d_model) → Dense → logits (b, n_classes), float32

The mixer is `mamba_jax.layers.mamba.MambaMixer` (the official Mamba-1 block, its init included); the
residual stream is kept in float32 like `DecoderLM`'s. The bidirectional variant (Vision Mamba, Zhu et al.
2024) gives each layer a second mixer with its own parameters that scans the reversed token sequence; its
output is flipped back and summed with the forward scan's, so every token sees the whole image.

Parameters: `embed.{kernel,bias}` (token_dim, d), `pos_embed` (L, d), `layers_{i}.{norm, mixer,
mixer_rev}`, `norm_f.weight`, `head.{kernel,bias}` (d, n_classes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.layers.config import DTYPES
from mamba_jax.layers.mamba import MambaConfig, MambaMixer
from mamba_jax.layers.norm import RMSNorm
from mamba_jax.ops.selective_scan import IMPLS


def _positive_int(name: str, value, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "an int >= 0" if zero_ok else "a positive int"
        raise ValueError(f"ClassifierConfig: `{name}` must be {what}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Hyper-parameters of `MambaClassifier`.

    image_height, image_width, channels: the input image (channels = 1 accepts (b, H, W) images too).
    patch_size: 0 = one token per pixel row (L = H tokens of W·C values); p > 0 = non-overlapping p×p
      patches (L = (H/p)·(W/p) tokens of p·p·C values; p must divide H and W).
    d_model, n_layer, d_state, d_conv, expand: the Mamba-1 blocks (`MambaConfig` fields).
    bidirectional: add a reversed-sequence scan to every layer (summed with the forward one).
    scan_impl: the selective-scan implementation (`mamba_jax.ops.selective_scan`).
    """

    n_classes: int = 10
    image_height: int = 28
    image_width: int = 28
    channels: int = 1
    patch_size: int = 0
    d_model: int = 32
    n_layer: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    bidirectional: bool = False
    scan_impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("n_classes", "image_height", "image_width", "channels", "d_model", "n_layer", "d_state",
                     "d_conv", "expand"):
            _positive_int(name, getattr(self, name))
        _positive_int("patch_size", self.patch_size, zero_ok=True)
        if self.n_classes < 2:
            raise ValueError(f"ClassifierConfig: `n_classes` must be >= 2; got {self.n_classes!r}")
        p = self.patch_size
        if p and (self.image_height % p or self.image_width % p):
            raise ValueError(f"ClassifierConfig: `patch_size`={p} must divide `image_height`={self.image_height} "
                             f"and `image_width`={self.image_width}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"ClassifierConfig: `bidirectional` must be a bool; got {self.bidirectional!r}")
        if self.scan_impl not in IMPLS + ("auto", "pallas"):
            raise ValueError(f"ClassifierConfig: `scan_impl` must be one of {IMPLS + ('auto', 'pallas')}; "
                             f"got {self.scan_impl!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ClassifierConfig: `{name}` must be one of {DTYPES}; got {getattr(self, name)!r}")

    @property
    def num_tokens(self) -> int:
        """L, the length of the token sequence the scan runs over."""
        p = self.patch_size
        return self.image_height if not p else (self.image_height // p) * (self.image_width // p)

    @property
    def token_dim(self) -> int:
        """The number of input values per token (W·C for rows, p·p·C for patches)."""
        p = self.patch_size
        return self.image_width * self.channels if not p else p * p * self.channels

    def mamba_config(self) -> MambaConfig:
        """The `MambaConfig` each mixer is built from (vocab_size is unused by a mixer)."""
        return MambaConfig(vocab_size=self.n_classes, d_model=self.d_model, n_layer=self.n_layer,
                           d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, scan_impl=self.scan_impl,
                           dtype=self.dtype, param_dtype=self.param_dtype)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ClassifierConfig":
        return dataclasses.replace(self, **changes)


def image_tokens(images: jax.Array, config: ClassifierConfig) -> jax.Array:
    """images (b, H, W) or (b, H, W, C) → tokens (b, L, token_dim) (rows, or p×p patches in raster order).

    Raises ValueError naming `images` when the shape does not match the config.
    """
    H, W, C = config.image_height, config.image_width, config.channels
    if images.ndim == 3 and C == 1:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (H, W, C):
        expected = f"(b, {H}, {W}, {C})" + (f" or (b, {H}, {W})" if C == 1 else "")
        raise ValueError(f"MambaClassifier: `images` must have shape {expected}; got {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"MambaClassifier: `images` must be floating point; got dtype {images.dtype}")
    b = images.shape[0]
    p = config.patch_size
    if not p:
        return images.reshape(b, H, W * C)
    x = images.reshape(b, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (H // p) * (W // p), p * p * C)


class ClassifierBlock(nn.Module):
    """h (b, L, d) float32 → h + mixer(norm(h)) [+ flip(mixer_rev(flip(norm(h))))], (b, L, d)."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        mcfg = cfg.mamba_config()
        normed = RMSNorm(mcfg.rms_norm_eps, mcfg.jnp_param_dtype, name="norm")(h).astype(mcfg.jnp_dtype)
        out, _ = MambaMixer(mcfg, name="mixer")(normed)
        if cfg.bidirectional:
            back, _ = MambaMixer(mcfg, name="mixer_rev")(jnp.flip(normed, axis=1))
            out = out + jnp.flip(back, axis=1)
        return h + out.astype(h.dtype)


class MambaClassifier(nn.Module):
    """`model.apply({"params": params}, images)` → logits (b, n_classes) float32 (see the module docstring).

    images: (b, H, W) (channels = 1) or (b, H, W, C) floats, e.g. pixel values scaled to [0, 1].
    """

    config: ClassifierConfig

    def __post_init__(self):
        if not isinstance(self.config, ClassifierConfig):
            raise ValueError(f"MambaClassifier: `config` must be a ClassifierConfig; got {type(self.config).__name__}")
        super().__post_init__()

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        tokens = image_tokens(jnp.asarray(images), cfg)                        # (b, L, token_dim)
        h = nn.Dense(cfg.d_model, dtype=dt, param_dtype=pdt, name="embed")(tokens.astype(dt))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (cfg.num_tokens, cfg.d_model), pdt)
        h = (h + pos.astype(dt)).astype(jnp.float32)                          # residual stream in float32
        for i in range(cfg.n_layer):
            h = ClassifierBlock(cfg, name=f"layers_{i}")(h)
        h = RMSNorm(1e-5, pdt, name="norm_f")(h)
        pooled = jnp.mean(h.astype(jnp.float32), axis=1)                      # (b, d_model)
        logits = nn.Dense(cfg.n_classes, dtype=dt, param_dtype=pdt, name="head")(pooled.astype(dt))
        return logits.astype(jnp.float32)


def classifier_flops(config: ClassifierConfig) -> int:
    """Analytic FLOPs (2 per multiply-add) of one image's forward: the token embedding, every mixer at every
    token (two per layer when bidirectional; `mamba_jax.models.sizes.mixer_flops_per_token`) and the head.
    Norms, positions, pooling and the softmax are element-wise and not counted. The quantity papers quote
    (matmuls + scan), beside which XLA's `cost_analysis` also counts element-wise work and, for a parallel
    scan, its extra combine steps."""
    from mamba_jax.models.sizes import mixer_flops_per_token

    mixers = config.n_layer * (2 if config.bidirectional else 1)
    embed = 2 * config.token_dim * config.d_model * config.num_tokens
    return embed + mixers * config.num_tokens * mixer_flops_per_token(config.mamba_config()) \
        + 2 * config.d_model * config.n_classes


def init_classifier(config: ClassifierConfig, rng: jax.Array) -> Tuple[MambaClassifier, Any]:
    """(model, params) of a fresh classifier; params initialised from `rng` on a (1, H, W, C) dummy image and
    unboxed (plain arrays; the mixers' logical axis names are dropped)."""
    model = MambaClassifier(config)
    dummy = jnp.zeros((1, config.image_height, config.image_width, config.channels), jnp.float32)
    return model, nn.meta.unbox(jax.jit(model.init)(rng, dummy)["params"])


def count_params(params) -> int:
    """The number of scalar parameters of a pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
