"""The Mamba-1 mixer (state-spaces/mamba's `Mamba` block) as a Flax Linen module.

Parameter names follow HF transformers' `MambaMixer` (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj) so that checkpoints map one to one; torch (out, in) weights are stored transposed (in, out).

`MambaConfig(bc_source="input")` is the Mamba-1 layer of MambaInLlama (arXiv 2408.15237, its
`mamba/hybrid_mamba_layer.py`), the form an attention layer is distilled into: x, B, C and Δ come from
the *layer input* (in_proj packs [z, x, B, C, dt_low]) instead of B, C, Δ from the conv output through
x_proj; x and B have `d_xb` channels (an attention layer's kv_heads · head_dim) and are repeated to
d_inner in chunks of d_state, and B/C are grouped: n_groups = d_inner / d_state groups of d_state.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Dict, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax.axes import CONV, EMBED, MLP, STATE
from mamba_jax.layers.config import (MAMBA, BaseLMConfig, check_choice, check_dt_range, check_positive_int,
                                     check_step_caches, ssm_param_dtype)
from mamba_jax.layers.init import (a_log_init, array_namespace, dt_bias_init, logical_param, projection,
                                   residual_out_scale, uniform_init)
from mamba_jax.ops import causal_conv1d, conv_state_steps, selective_state_steps
from mamba_jax.ops.selective_scan import IMPLS
from mamba_jax.sharding.kernels import selective_scan_on_mesh

BC_SOURCES = ("conv", "input")   # where B, C, Δ come from: the conv output (official) or the layer input

@dataclasses.dataclass(frozen=True)
class MambaConfig(BaseLMConfig):
    """Hyper-parameters of a Mamba-1 language model (defaults: the official ones).

    d_inner = expand · d_model; dt_rank "auto" = ceil(d_model / 16). The common fields (vocabulary,
    width, depth, norms, dtypes, optional MLP) are those of `BaseLMConfig`.

    bc_source: "conv" (the official block, the default) or "input" (MambaInLlama's attention-initialisable
    form: in_proj packs [z, x, B, C, dt] from the layer input, B/C in n_groups = d_inner / d_state groups).
    d_xb: with bc_source="input", the width of x and B before their repetition to d_inner (an attention
    layer's kv_heads · head_dim; None: d_inner, no repetition). Must be a multiple of d_state dividing d_inner.
    selective: True (S6, the default): Δ, B and C are functions of the input (x_proj, dt_proj). False: the
    LTI ablation of the Mamba paper (its Table 1, "S4"): Δ = softplus(dt_proj_bias) per channel, B and C
    learned (d_state,) vectors — the same at every position and for every input (bc_source="conv" only).
    """

    family: ClassVar[str] = "mamba"
    RENAMED: ClassVar[Dict[str, str]] = {"scan_chunk_size": "chunk_size"}

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, str] = "auto"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False
    scan_impl: str = "auto"
    chunk_size: int = 256
    bc_source: str = "conv"
    d_xb: Optional[int] = None
    selective: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("d_state", "d_conv", "expand", "chunk_size"):
            check_positive_int("MambaConfig", name, getattr(self, name))
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"MambaConfig: `dt_rank` must be 'auto' or a positive int; got {self.dt_rank!r}")
        check_dt_range("MambaConfig", self.dt_min, self.dt_max, self.dt_init_floor)
        check_choice("MambaConfig", "scan_impl", self.scan_impl, IMPLS + ("auto", "pallas"))
        check_choice("MambaConfig", "bc_source", self.bc_source, BC_SOURCES)
        if not isinstance(self.selective, bool):
            raise ValueError(f"MambaConfig: `selective` must be a bool; got {self.selective!r}")
        if not self.selective and self.bc_source != "conv":
            raise ValueError("MambaConfig: selective=False (the LTI ablation) needs bc_source='conv'")
        if self.bc_source == "conv":
            if self.d_xb is not None:
                raise ValueError("MambaConfig: `d_xb` is only used with bc_source='input'; leave it None")
            return
        if self.d_xb is not None:
            check_positive_int("MambaConfig", "d_xb", self.d_xb)
        n, di, dxb = self.d_state, self.d_inner, self.d_xb_value
        if di % n or dxb % n or di % dxb:
            raise ValueError(f"MambaConfig: with bc_source='input', `d_state`={n} must divide d_inner={di} and "
                             f"`d_xb`={dxb}, and d_xb must divide d_inner")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (MAMBA,) * self.n_layer

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def d_xb_value(self) -> int:
        """Channels of x and B before their repetition to d_inner (bc_source="input"; d_inner when None)."""
        return self.d_inner if self.d_xb is None else self.d_xb

    @property
    def n_groups(self) -> int:
        """B/C groups of the scan: 1 (bc_source="conv") or d_inner / d_state (bc_source="input")."""
        return 1 if self.bc_source == "conv" else self.d_inner // self.d_state


class LayerCache(NamedTuple):
    """Recurrent state of one Mamba layer.

    conv_state: (b, d_conv - 1, d_inner), the last inputs of the causal conv (model dtype).
    ssm_state:  (b, d_inner, d_state), float32.
    A mixer called with `step_caches=True` returns both with a step axis after the batch — (b, l, d_conv - 1,
    d_inner) and (b, l, d_inner, d_state), the state after each position of the chunk — for rollback.
    """

    conv_state: jax.Array
    ssm_state: jax.Array


def repeat_groups(v, size: int, repeats: int):
    """(..., k·size) -> (..., k·repeats·size): each chunk of `size` channels repeated `repeats` times in
    place (chunk 0, chunk 0, ..., chunk 1, ...), as grouped-query attention repeats kv heads (MambaInLlama's
    `repeat_kv` with head_dim = d_state)."""
    if repeats == 1:
        return v
    lead, width = v.shape[:-1], v.shape[-1]
    return jnp.repeat(v.reshape(*lead, width // size, size), repeats, axis=-2).reshape(*lead, width * repeats)


class MambaMixer(nn.Module):
    """Mamba-1 mixer. x: (b, l, d_model) -> (b, l, d_model), plus the new LayerCache when one is given.

    `mask` (b, l) marks real tokens (1) and left padding (0): padded positions are zeroed before and
    after the conv and get Δ = 0, so they leave the state exactly as it was (by selection: a NaN at a
    padding position reaches no real one).

    bc_source="conv" (the official block): in_proj kernel (2, d_model, d_inner) → pieces [x, z]; x_proj
    (d_inner, dt_rank + 2·d_state) on the conv output → [dt_low, B, C].
    bc_source="input" (MambaInLlama): in_proj_zc (2, d_model, d_inner) → [z, C], in_proj_xb (2, d_model, d_xb)
    → [x, B], in_proj_dt (d_model, dt_rank) → dt_low; no x_proj; x and B repeated to d_inner in chunks of
    d_state (x before the conv), B, C: (b, l, d_inner / d_state, d_state), channel c of the scan reads
    group c // d_state.
    Pieces of equal width share a kernel with a pieces axis, so tensor parallelism splits each along its
    width (`layers.init.projection`); `fused_in_proj` / `split_in_proj` convert to and from the fused column
    order of HF, the official code and MambaInLlama.
    With `cache` and l == 1 the single-step update is used (decoding). `step_caches=True` (with a cache)
    steps through the chunk the same way and returns the state after every position (see `LayerCache`):
    speculative decoding verifies a chunk in one call and rolls back to the accepted position.
    """

    config: MambaConfig

    @nn.compact
    def __call__(self, x, *, positions=None, seq_idx=None, mask=None, cache: Optional[LayerCache] = None,
                 deterministic: bool = True, step_caches: bool = False):
        del positions, deterministic  # the recurrence carries position; no train-only behaviour
        cfg = self.config
        check_step_caches("MambaMixer", step_caches, cache, seq_idx)
        di, n, r, k = cfg.d_inner, cfg.d_state, cfg.dt_rank_value, cfg.d_conv
        pdt, dt_ = cfg.jnp_param_dtype, cfg.jnp_dtype
        dense = functools.partial(projection, dtype=dt_, param_dtype=pdt)

        from_input = cfg.bc_source == "input"
        if from_input:   # [z | C] and [x | B] as pieces of equal width, dt_low alone (see `projection`)
            dxb, rep = cfg.d_xb_value, di // cfg.d_xb_value
            zc = dense((2, di), cfg.bias, (None, EMBED, MLP), "in_proj_zc")(x)
            xb = dense((2, dxb), cfg.bias, (None, EMBED, MLP), "in_proj_xb")(x)
            dt_low = dense(r, cfg.bias, (EMBED, None), "in_proj_dt")(x)
            z, C_in, x_in, B_in = zc[..., 0, :], zc[..., 1, :], xb[..., 0, :], xb[..., 1, :]
            x_in = repeat_groups(x_in, n, rep)                   # repeat_kv_before_conv, as MambaInLlama
            groups = (*B_in.shape[:-1], cfg.n_groups, n)
            B, C = repeat_groups(B_in, n, rep).reshape(groups), C_in.reshape(groups)
        else:            # [x | z] as two pieces of one (2, d_model, d_inner) kernel
            xz = dense((2, di), cfg.bias, (None, EMBED, MLP), "in_proj")(x)
            x_in, z = xz[..., 0, :], xz[..., 1, :]
        # Masks select (`where`), never multiply: whatever a padding position holds (NaN included) stays there.
        real = None if mask is None else (mask != 0)[..., None]
        if real is not None:
            x_in = jnp.where(real, x_in, jnp.zeros((), x_in.dtype))

        conv_w = logical_param(self, "conv1d_kernel", uniform_init(1 / math.sqrt(k)), (CONV, MLP), (k, di), pdt)
        conv_b = (logical_param(self, "conv1d_bias", uniform_init(1 / math.sqrt(k)), (MLP,), (di,), pdt)
                  if cfg.conv_bias else None)
        x_conv, conv_state = causal_conv1d(
            x_in, conv_w.astype(dt_), None if conv_b is None else conv_b.astype(dt_),
            conv_state=None if cache is None else cache.conv_state, seq_idx=seq_idx, activation="silu")
        if real is not None:
            x_conv = jnp.where(real, x_conv, jnp.zeros((), x_conv.dtype))

        sdt = ssm_param_dtype(pdt)   # A_log, D and the Δ bias stay float32 under a bf16 param_dtype
        bias_init = dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        # The order of creation fixes each parameter's init key: dt_proj kernel, then bias, as always.
        if not cfg.selective:   # LTI: Δ, B, C are parameters, the same at every position and for every input
            dt_b = logical_param(self, "dt_proj_bias", bias_init, (MLP,), (di,), sdt)
            lti_shape = x_conv.shape[:-1]
            B = jnp.broadcast_to(logical_param(self, "B", nn.initializers.ones, (STATE,), (n,), sdt),
                                 (*lti_shape, n)).astype(x_conv.dtype)
            C = jnp.broadcast_to(logical_param(self, "C", nn.initializers.normal(1.0), (STATE,), (n,), sdt),
                                 (*lti_shape, n)).astype(x_conv.dtype)
            delta = jnp.broadcast_to(jax.nn.softplus(dt_b.astype(jnp.float32)), (*lti_shape, di))
        else:
            if not from_input:
                x_dbl = dense(r + 2 * n, False, (MLP, None), "x_proj")(x_conv)
                dt_low, B, C = jnp.split(x_dbl, [r, r + n], axis=-1)
            dt_w = logical_param(self, "dt_proj_kernel", uniform_init(r ** -0.5 * cfg.dt_scale), (None, MLP),
                                 (r, di), pdt)
            dt_b = logical_param(self, "dt_proj_bias", bias_init, (MLP,), (di,), sdt)
            # Δ in float32: softplus(dt_low · W + b), zero at padding.
            delta = jax.nn.softplus(dt_low.astype(jnp.float32) @ dt_w.astype(jnp.float32)
                                    + dt_b.astype(jnp.float32))
        if real is not None:
            delta = jnp.where(real, delta, jnp.zeros((), delta.dtype))
            if from_input:   # B and C read the layer input directly, not the zeroed conv output
                B, C = (jnp.where(real[..., None], v, jnp.zeros((), v.dtype)) for v in (B, C))
        A_log = logical_param(self, "A_log", a_log_init, (MLP, STATE), (di, n), sdt)
        D = logical_param(self, "D", nn.initializers.ones, (MLP,), (di,), sdt)
        A = -jnp.exp(A_log.astype(jnp.float32))
        initial_state = None if cache is None else cache.ssm_state

        if cache is not None and (x.shape[1] == 1 or step_caches):   # decoding, or a chunk to verify
            y, ssm_state = selective_state_steps(cache.ssm_state, x_conv, delta, A, B, C, D=D, z=z)
            if step_caches:
                conv_state = conv_state_steps(cache.conv_state, x_in)
            else:
                ssm_state = ssm_state[:, -1]
        else:
            y, ssm_state = selective_scan_on_mesh(
                x_conv, delta, A, B, C, D=D, z=z, initial_state=initial_state, seq_idx=seq_idx,
                return_final_state=True, impl=cfg.scan_impl, chunk_size=cfg.chunk_size)

        out = dense(cfg.d_model, cfg.bias, (MLP, EMBED), "out_proj", scale=residual_out_scale(cfg))(y)
        new_cache = None if cache is None else LayerCache(conv_state, ssm_state)
        return out, new_cache


def fused_in_proj(params, config: MambaConfig):
    """(kernel (d_model, width), bias (width,) or None): a MambaMixer's input projections as one matrix in the
    fused column order — [x | z] (HF, official) or, bc_source="input", [z | x | B | C | dt_low] (MambaInLlama).
    `params`: the mixer's params (numpy or jax arrays)."""
    if config.bc_source == "conv":
        p = params["in_proj"]
        cat = array_namespace(p["kernel"]).concatenate
        return cat(list(p["kernel"]), axis=1), (None if "bias" not in p else p["bias"].reshape(-1))
    zc, xb, dt = params["in_proj_zc"], params["in_proj_xb"], params["in_proj_dt"]
    cat = array_namespace(zc["kernel"]).concatenate
    kernel = cat([zc["kernel"][0], xb["kernel"][0], xb["kernel"][1], zc["kernel"][1], dt["kernel"]], axis=1)
    if "bias" not in zc:
        return kernel, None
    return kernel, cat([zc["bias"][0], xb["bias"][0], xb["bias"][1], zc["bias"][1], dt["bias"]])


def split_in_proj(kernel, bias, config: MambaConfig):
    """The inverse of `fused_in_proj`: {param name: {"kernel": ..., "bias": ...}} for the mixer's params (either
    of kernel and bias may be None: it is then left out)."""
    di, dxb, r = config.d_inner, config.d_xb_value, config.dt_rank_value
    out = {}
    if config.bc_source == "conv":
        out["in_proj"] = {}
        if kernel is not None:
            out["in_proj"]["kernel"] = array_namespace(kernel).stack([kernel[:, :di], kernel[:, di:]])
        if bias is not None:
            out["in_proj"]["bias"] = bias.reshape(2, di)
        return out
    cuts = (0, di, di + dxb, di + 2 * dxb, 2 * di + 2 * dxb, 2 * di + 2 * dxb + r)
    out.update(in_proj_zc={}, in_proj_xb={}, in_proj_dt={})
    for leaf, value in (("kernel", kernel), ("bias", bias)):
        if value is None:
            continue
        z, x, B, C, dt = (value[..., a:b] for a, b in zip(cuts[:-1], cuts[1:]))
        stack = array_namespace(value).stack
        out["in_proj_zc"][leaf] = stack([z, C])
        out["in_proj_xb"][leaf] = stack([x, B])
        out["in_proj_dt"][leaf] = dt
    return out


def init_layer_cache(config: MambaConfig, batch_size: int, max_len: Optional[int] = None) -> LayerCache:
    """A zero LayerCache for `batch_size` sequences (`max_len` is unused: the state has a fixed size)."""
    del max_len
    return LayerCache(
        conv_state=jnp.zeros((batch_size, config.d_conv - 1, config.d_inner), config.jnp_dtype),
        ssm_state=jnp.zeros((batch_size, config.d_inner, config.d_state),
                            jnp.promote_types(jnp.float32, config.jnp_dtype)),
    )
