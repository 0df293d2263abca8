"""The Mamba-2 mixer (state-spaces/mamba's `Mamba2` block) as a Flax Linen module.

Parameters (HF transformers' `Mamba2Mixer` names where one tensor maps to one parameter): the fused HF
in_proj is stored as `in_proj_zx.kernel` (2, d_model, d_inner) = [z, x], `in_proj_bc.kernel`
(2, d_model, n_groups·d_state) = [B, C] and `in_proj_dt.kernel` (d_model, n_heads); the conv over xBC as
`conv1d_x_kernel` (k, d_inner) and `conv1d_bc_kernel` (k, 2·n_groups·d_state) (+ `_bias`); `dt_bias`, `A_log`,
`D` (n_heads,), `norm_weight` (d_inner,), `out_proj.kernel` (d_inner, d_model). Split so that tensor
parallelism cuts every piece along its own width (`fused_in_proj`/`split_in_proj`, `fused_conv`/`split_conv`
convert to the official layout).

The gated RMSNorm uses `gated_norm_eps`, a fixed 1e-5 by default as in the official block (whose
`RMSNormGated` ignores the model's norm epsilon); HF uses `layer_norm_epsilon` for every norm, and `load_hf`
sets gated_norm_eps from it. Δ is clamped to [dt_limit_min, dt_limit_max] in the parallel forward
and in the decoding step alike (the official and HF steps skip the clamp; with the default limits
(0, inf) the two agree).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.layers.config import (MAMBA2, BaseLMConfig, check_choice, check_dt_range, check_positive_int,
                                     check_step_caches, ssm_param_dtype)
from mamba_jax.layers.init import (array_namespace, dt_bias_init, logical_param, projection, residual_out_scale,
                                   uniform_init)
from mamba_jax.ops import causal_conv1d, conv_state_steps, gated_rms_norm, selective_state_steps
from mamba_jax.ops._checks import check_array
from mamba_jax.ops.ssd import SSD_IMPLS
from mamba_jax.axes import CONV, EMBED, HEADS, MLP
from mamba_jax.sharding.kernels import constrain_batch, ssd_on_mesh


@dataclasses.dataclass(frozen=True)
class Mamba2Config(BaseLMConfig):
    """Hyper-parameters of a Mamba-2 language model (defaults: the official `Mamba2` block).

    d_inner = expand · d_model = n_heads · head_dim; B and C have `n_groups` groups (dividing n_heads);
    the conv runs over xBC, conv_dim = d_inner + 2 · n_groups · d_state channels. A = -exp(A_log) with
    A ~ U[A_init_min, A_init_max] per head at init; Δ = softplus(dt + dt_bias), clamped to
    [dt_limit_min, dt_limit_max] (None: no upper limit). The gated RMSNorm normalises each of the
    n_groups groups of d_inner / n_groups channels, with epsilon `gated_norm_eps` (the official block's fixed
    1e-5, independent of `rms_norm_eps`).
    """

    family: ClassVar[str] = "mamba2"
    RENAMED: ClassVar[Dict[str, str]] = {"headdim": "head_dim", "ngroups": "n_groups", "ssd_impl": "scan_impl"}

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0
    dt_limit_max: Optional[float] = None
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    gated_norm_eps: float = 1e-5
    chunk_size: int = 256
    scan_impl: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            check_positive_int("Mamba2Config", name, getattr(self, name))
        if self.d_inner % self.head_dim:
            raise ValueError(f"Mamba2Config: d_inner = expand·d_model = {self.d_inner} must be a multiple of "
                             f"`head_dim`={self.head_dim}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"Mamba2Config: `n_groups`={self.n_groups} must divide n_heads = {self.n_heads}")
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ValueError(f"Mamba2Config: need 0 < A_init_min <= A_init_max; got "
                             f"({self.A_init_min}, {self.A_init_max})")
        check_choice("Mamba2Config", "scan_impl", self.scan_impl, SSD_IMPLS + ("auto", "pallas"))
        check_dt_range("Mamba2Config", self.dt_min, self.dt_max, self.dt_init_floor)
        if not (isinstance(self.dt_limit_min, (int, float)) and self.dt_limit_min >= 0
                and (self.dt_limit_max is None or self.dt_limit_max > self.dt_limit_min)):
            raise ValueError(f"Mamba2Config: need 0 <= `dt_limit_min` < `dt_limit_max` (None: no upper limit); "
                             f"got ({self.dt_limit_min!r}, {self.dt_limit_max!r})")
        if isinstance(self.gated_norm_eps, bool) or not isinstance(self.gated_norm_eps, (int, float)) \
                or not self.gated_norm_eps > 0:
            raise ValueError(f"Mamba2Config: `gated_norm_eps` must be a number > 0; got {self.gated_norm_eps!r}")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (MAMBA2,) * self.n_layer

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


class Mamba2Cache(NamedTuple):
    """Recurrent state of one Mamba-2 layer.

    conv_state: (b, d_conv - 1, conv_dim), the last inputs (xBC) of the causal conv (model dtype).
    ssm_state:  (b, n_heads, head_dim, d_state), float32 (float64 for float64 models).
    A mixer called with `step_caches=True` returns both with a step axis after the batch (the state after
    each position of the chunk), for rollback.
    """

    conv_state: jax.Array
    ssm_state: jax.Array


def a_log_uniform_init(a_min: float, a_max: float):
    """The official Mamba-2 init: A_log = log(A), A ~ U[a_min, a_max] per head (so A = -exp(A_log))."""
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, a_min, a_max)).astype(dtype)
    return init


def _check_inputs(cfg: Mamba2Config, x, mask, cache) -> None:
    """Trace-time checks of the mixer's inputs; errors name the argument and the expected shape."""
    fn = "Mamba2Mixer"
    check_array(fn, "x", x, ("b", "l", cfg.d_model))
    b, l = x.shape[:2]
    if mask is not None:
        check_array(fn, "mask", mask, (b, l), kind="any")
    if cache is not None:
        if not isinstance(cache, Mamba2Cache):
            raise ValueError(f"{fn}: `cache` must be a Mamba2Cache (from `init_mamba2_cache`); "
                             f"got {type(cache).__name__}")
        check_array(fn, "cache.conv_state", cache.conv_state, (b, cfg.d_conv - 1, cfg.conv_dim))
        check_array(fn, "cache.ssm_state", cache.ssm_state, (b, cfg.n_heads, cfg.head_dim, cfg.d_state))


def _decode_steps(state, x, delta, A, B, C, D):
    """The recurrence step by step over a short chunk, heads flattened into channels (`selective_state_steps`).

    state: (b, h, p, n); x: (b, l, h, p); delta: (b, l, h) (already Δ: bias, softplus, clamp, mask applied);
    A, D: (h,); B, C: (b, l, g, n). Returns (y (b, l, h, p) in the dtype of `x`, the state after each position
    (b, l, h, p, n)): state ← exp(Δ A) state + Δ x ⊗ B ;  y = state · C + D x.
    """
    b, h, p, n = state.shape
    l = x.shape[1]
    y, states = selective_state_steps(
        state.reshape(b, h * p, n), x.reshape(b, l, h * p), jnp.repeat(delta, p, axis=-1),
        jnp.broadcast_to(jnp.repeat(A, p)[:, None], (h * p, n)), B, C, D=jnp.repeat(D, p))
    return y.reshape(b, l, h, p), states.reshape(b, l, h, p, n)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer. x: (b, l, d_model) -> (b, l, d_model), plus the new Mamba2Cache when one is given.

        in_proj → [z (d_inner), xBC (conv_dim), dt (n_heads)];  xBC ← silu(conv(xBC)) → [x, B, C]
        Δ = clamp(softplus(dt + dt_bias));  y = SSD(x, Δ, A = -exp(A_log), B, C) + D x
        out = out_proj(gated_rms_norm(y, z), one norm per group of d_inner / n_groups channels)

    `mask` (b, l) marks real tokens (1) and left padding (0): xBC is zeroed before and after the conv and
    Δ = 0 at pads, so they leave the state exactly as it was. `seq_idx` (b, l) resets the conv and the
    state where it changes (packed sequences). With `cache` and l == 1 the single-step recurrence is used
    (decoding); with l > 1 the sequence continues from the cache (chunked prefill); `step_caches=True` steps
    through the chunk and returns the state after every position (see `Mamba2Cache`).
    """

    config: Mamba2Config

    @nn.compact
    def __call__(self, x, *, positions=None, seq_idx=None, mask=None, cache: Optional[Mamba2Cache] = None,
                 deterministic: bool = True, step_caches: bool = False):
        del positions, deterministic  # the recurrence carries position; no train-only behaviour
        cfg = self.config
        _check_inputs(cfg, x, mask, cache)
        check_step_caches("Mamba2Mixer", step_caches, cache, seq_idx)
        b, l, _ = x.shape
        di, n, g, h, p, k = cfg.d_inner, cfg.d_state, cfg.n_groups, cfg.n_heads, cfg.head_dim, cfg.d_conv
        pdt, dt_ = cfg.jnp_param_dtype, cfg.jnp_dtype
        cd = jnp.promote_types(jnp.float32, dt_)
        dense = functools.partial(projection, dtype=dt_, param_dtype=pdt)

        # The official fused in_proj [z | x | B | C | dt] as pieces that tensor parallelism splits along their
        # width: [z | x] (2, d_model, d_inner) over the channels, [B | C] (2, d_model, g·n) replicated, dt
        # (d_model, h) over the heads (`fused_in_proj` / `split_in_proj` convert).
        zx = dense((2, di), cfg.bias, (None, EMBED, MLP), "in_proj_zx")(x)
        bc = dense((2, g * n), cfg.bias, (None, EMBED, None), "in_proj_bc")(x)
        dt = dense(h, cfg.bias, (EMBED, HEADS), "in_proj_dt")(x)
        # B and C are read by every head: kept whole on every device (split over the batch only), or GSPMD
        # would shard their groups with the heads and move them back and forth around the conv
        z, xs, bc = zx[..., 0, :], zx[..., 1, :], constrain_batch(bc.reshape(*bc.shape[:-2], 2 * g * n))
        # Masks select (`where`), never multiply: whatever a padding position holds (NaN included) stays there.
        real = None if mask is None else (mask != 0)[..., None]

        conv_inputs = []

        def conv(v, name, axis, width, state):   # the causal conv over x or over [B | C], zeroed at padding
            if real is not None:
                v = jnp.where(real, v, jnp.zeros((), v.dtype))
            conv_inputs.append(v)
            w = logical_param(self, f"conv1d_{name}_kernel", uniform_init(1 / math.sqrt(k)), (CONV, axis),
                              (k, width), pdt)
            bias = (logical_param(self, f"conv1d_{name}_bias", uniform_init(1 / math.sqrt(k)), (axis,), (width,), pdt)
                    if cfg.conv_bias else None)
            v, state = causal_conv1d(v, w.astype(dt_), None if bias is None else bias.astype(dt_), conv_state=state,
                                     seq_idx=seq_idx, activation="silu")
            return (v if real is None else jnp.where(real, v, jnp.zeros((), v.dtype))), state

        state_x = state_bc = None
        if cache is not None:     # the cache keeps the conv inputs in the fused order [x | B | C]
            state_x, state_bc = cache.conv_state[..., :di], cache.conv_state[..., di:]
        xs, state_x = conv(xs, "x", MLP, di, state_x)
        bc, state_bc = conv(bc, "bc", None, 2 * g * n, state_bc)
        bc = constrain_batch(bc)
        conv_state = jnp.concatenate([state_x, state_bc], axis=-1)
        if step_caches:
            conv_state = conv_state_steps(cache.conv_state, jnp.concatenate(conv_inputs, axis=-1))
        xs = xs.reshape(b, l, h, p)
        B, C = (constrain_batch(v.reshape(b, l, g, n)) for v in (bc[..., :g * n], bc[..., g * n:]))

        sdt = ssm_param_dtype(pdt)   # A_log, D and the Δ bias stay float32 under a bf16 param_dtype
        dt_bias = logical_param(self, "dt_bias", dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), (HEADS,), (h,), sdt)
        A_log = logical_param(self, "A_log", a_log_uniform_init(cfg.A_init_min, cfg.A_init_max), (HEADS,), (h,), sdt)
        D = logical_param(self, "D", nn.initializers.ones, (HEADS,), (h,), sdt)
        # Δ (b, l, h) in float32: clamp(softplus(dt + dt_bias)), exactly 0 at padding.
        delta = jnp.clip(jax.nn.softplus(dt.astype(cd) + dt_bias.astype(cd)), cfg.dt_limit_min, cfg.dt_limit_max)
        if real is not None:
            delta = jnp.where(real, delta, jnp.zeros((), cd))
        A = -jnp.exp(A_log.astype(cd))

        if cache is not None and (l == 1 or step_caches):   # decoding, or a chunk to verify
            y, ssm_state = _decode_steps(cache.ssm_state, xs, delta, A, B, C, D)
            if not step_caches:
                ssm_state = ssm_state[:, -1]
        else:
            out = ssd_on_mesh(xs, delta, A, B, C, cfg.chunk_size, D=D, seq_idx=seq_idx,
                      initial_state=None if cache is None else cache.ssm_state,
                      return_final_state=cache is not None, impl=cfg.scan_impl)
            y, ssm_state = out if cache is not None else (out, None)

        norm_w = logical_param(self, "norm_weight", nn.initializers.ones, (MLP,), (di,), pdt)
        y = gated_rms_norm(y.reshape(b, l, di), z, norm_w, di // g, cfg.gated_norm_eps, cfg.norm_before_gate)
        out = dense(cfg.d_model, cfg.bias, (MLP, EMBED), "out_proj", scale=residual_out_scale(cfg))(y)
        new_cache = None if cache is None else Mamba2Cache(conv_state, ssm_state)
        return out, new_cache


def fused_in_proj(params, config: Mamba2Config):
    """(kernel (d_model, 2·d_inner + 2·g·n + h), bias or None): a Mamba2Mixer's input projections as one
    matrix in the official / HF column order [z | x | B | C | dt]. `params`: the mixer's (numpy or jax)."""
    zx, bc, dt = params["in_proj_zx"], params["in_proj_bc"], params["in_proj_dt"]
    cat = array_namespace(zx["kernel"]).concatenate
    kernel = cat([*zx["kernel"], *bc["kernel"], dt["kernel"]], axis=1)
    if "bias" not in zx:
        return kernel, None
    return kernel, cat([zx["bias"].reshape(-1), bc["bias"].reshape(-1), dt["bias"]])


def split_in_proj(kernel, bias, config: Mamba2Config):
    """The inverse of `fused_in_proj`: {param name: {"kernel": ..., "bias": ...}} for the mixer's params (either
    of kernel and bias may be None: it is then left out)."""
    di, gn, h = config.d_inner, config.n_groups * config.d_state, config.n_heads
    pieces = (("in_proj_zx", 0, 2 * di, (2, di)), ("in_proj_bc", 2 * di, 2 * di + 2 * gn, (2, gn)),
              ("in_proj_dt", 2 * di + 2 * gn, 2 * di + 2 * gn + h, None))
    out = {}
    for name, a, b, shape in pieces:
        out[name] = {}
        if kernel is not None:
            k = kernel[:, a:b]
            out[name]["kernel"] = k if shape is None else array_namespace(k).stack([k[:, :shape[1]], k[:, shape[1]:]])
        if bias is not None:
            out[name]["bias"] = bias[a:b] if shape is None else bias[a:b].reshape(shape)
    return out


def fused_conv(params, config: Mamba2Config):
    """(kernel (k, conv_dim), bias or None): the convs over x and over [B | C] as the official one conv over
    xBC = [x | B | C]."""
    cat = array_namespace(params["conv1d_x_kernel"]).concatenate
    kernel = cat([params["conv1d_x_kernel"], params["conv1d_bc_kernel"]], axis=1)
    if "conv1d_x_bias" not in params:
        return kernel, None
    return kernel, cat([params["conv1d_x_bias"], params["conv1d_bc_bias"]])


def split_conv(kernel, bias, config: Mamba2Config):
    """The inverse of `fused_conv`: {param name: array} for the mixer's params (kernel or bias may be None)."""
    di = config.d_inner
    out = {} if kernel is None else {"conv1d_x_kernel": kernel[:, :di], "conv1d_bc_kernel": kernel[:, di:]}
    if bias is not None:
        out.update(conv1d_x_bias=bias[:di], conv1d_bc_bias=bias[di:])
    return out


def init_mamba2_cache(config: Mamba2Config, batch_size: int, max_len: Optional[int] = None) -> Mamba2Cache:
    """A zero Mamba2Cache for `batch_size` sequences (`max_len` is unused: the state has a fixed size)."""
    del max_len
    return Mamba2Cache(
        conv_state=jnp.zeros((batch_size, config.d_conv - 1, config.conv_dim), config.jnp_dtype),
        ssm_state=jnp.zeros((batch_size, config.n_heads, config.head_dim, config.d_state),
                            jnp.promote_types(jnp.float32, config.jnp_dtype)),
    )
