"""HF transformers Mamba-2 (`model_type: "mamba2"`, `Mamba2ForCausalLM`) <-> Mamba2LM.

`FAMILY` is what `mamba_jax.interop.hf.load_hf/save_hf` dispatch to for Mamba-2 checkpoints.

config.json (transformers `Mamba2Config`) -> Mamba2Config:

    hidden_size → d_model, num_hidden_layers → n_layer, state_size → d_state, conv_kernel → d_conv,
    expand, head_dim, num_heads (must equal expand·hidden_size / head_dim), n_groups (the same names here),
    use_bias → bias, use_conv_bias → conv_bias, layer_norm_epsilon → rms_norm_eps and gated_norm_eps (HF
    uses it for every norm, the gated one included), time_step_{min,max,floor} → dt_{min,max,init_floor}, time_step_limit → dt_limit_{min,max}
    (an infinite upper limit is None), chunk_size, residual_in_fp32, tie_word_embeddings → tie_embeddings.
    HF normalises after gating (norm_before_gate=False) and has no MLP: other settings are refused.

Tensor names (torch layout; our layout in brackets), conv_dim = d_inner + 2·n_groups·d_state:

    backbone.embeddings.weight (HF) / backbone.embedding.weight (official)  (V, d)  [embeddings.embedding (Vp, d)]
    backbone.layers.{i}.norm.weight              (d,)                              [layers_{i}.norm.weight]
    backbone.layers.{i}.mixer.in_proj.weight     (2·di + 2·g·n + h, d)             rows [z | x | B | C | dt] →
                                                 [in_proj_zx.kernel (2, d, di), in_proj_bc.kernel (2, d, g·n),
                                                  in_proj_dt.kernel (d, h)]
    backbone.layers.{i}.mixer.in_proj.bias       (2·di + 2·g·n + h,)  if use_bias  [in_proj_{zx,bc,dt}.bias]
    backbone.layers.{i}.mixer.conv1d.weight      (conv_dim, 1, k)  rows [x | B | C] → [conv1d_x_kernel (k, di),
                                                                                     conv1d_bc_kernel (k, 2·g·n)]
    backbone.layers.{i}.mixer.conv1d.bias        (conv_dim,)          if conv bias [conv1d_x_bias, conv1d_bc_bias]
    backbone.layers.{i}.mixer.dt_bias / A_log / D  (h,)
    backbone.layers.{i}.mixer.norm.weight        (di,)                             [norm_weight]
    backbone.layers.{i}.mixer.out_proj.weight    (d, di)                           [out_proj.kernel (di, d)]
    backbone.layers.{i}.mixer.out_proj.bias      (d,)                 if use_bias
    backbone.norm_f.weight                       (d,)
    lm_head.weight                               (V, d)   untied only              [lm_head.kernel (d, Vp)]
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from mamba_jax.interop.hf_common import (EMBED_HF, EMBED_OFFICIAL, LM_HEAD, HFFamily, TensorSpec, conv_to_ours,
                                         conv_to_torch, keep, official_ssm_cfg, transpose)
from mamba_jax.layers.mamba2 import Mamba2Config, fused_conv, fused_in_proj, split_conv, split_in_proj
from mamba_jax.models.mamba2 import Mamba2LM

__all__ = ["FAMILY", "config_from_hf", "config_to_hf", "tensor_specs"]

MODEL_TYPE = "mamba2"


def _require(raw: Mapping[str, Any], key: str):
    if key not in raw:
        raise ValueError(f"load_hf: Mamba-2 config.json has no `{key}`")
    return raw[key]


def _json_float(value) -> float:
    """A float from config.json: a number, or transformers 5's {"__float__": "Infinity"} for non-finite ones."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        value = value["__float__"]
    return float(value)


def _dt_limit(raw: Mapping[str, Any]) -> Tuple[float, Any]:
    """(dt_limit_min, dt_limit_max or None) from `time_step_limit` [min, max] (default (0, inf))."""
    limit = raw.get("time_step_limit", (0.0, math.inf))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise ValueError(f"load_hf: config.json `time_step_limit` must be a pair [min, max]; got {limit!r}")
    try:
        lo, hi = _json_float(limit[0]), _json_float(limit[1])
    except (TypeError, ValueError):
        raise ValueError(f"load_hf: config.json `time_step_limit` must be a pair of numbers; got {limit!r}") from None
    if not 0.0 <= lo < hi:
        raise ValueError(f"load_hf: config.json `time_step_limit` must satisfy 0 <= min < max; got {limit!r}")
    return lo, (None if math.isinf(hi) else hi)


# ssm_cfg keys of the official Mamba2 block that do not change the forward computation.
_OFFICIAL_IGNORED = ("layer", "conv_init", "use_mem_eff_path", "layer_idx", "process_group", "sequence_parallel",
                     "device", "dtype", "dt_init")


def is_official_mamba2(raw: Mapping[str, Any]) -> bool:
    """True for an official state-spaces config.json whose `ssm_cfg.layer` is "Mamba2"."""
    return "model_type" not in raw and "d_model" in raw and (raw.get("ssm_cfg") or {}).get("layer") == "Mamba2"


def config_from_official(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of Mamba2Config from an official state-spaces config.json (ssm_cfg.layer "Mamba2").

    Missing ssm_cfg keys take the official `Mamba2` defaults. Refused (naming the key): attention layers
    (`attn_layer_idx`), MLPs (`d_intermediate`), LayerNorm (`rms_norm` false), `d_ssm` other than the
    inner width, `D_has_hdim`, an ungated norm (`rmsnorm` false).
    """
    used = ("d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "dt_min", "dt_max",
            "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size", "norm_before_gate", "d_ssm",
            "D_has_hdim", "rmsnorm")
    ssm = official_ssm_cfg(raw, used + _OFFICIAL_IGNORED, "Mamba2LM")
    d_model, expand = int(_require(raw, "d_model")), int(ssm.get("expand", 2))
    if ssm.get("d_ssm") not in (None, expand * d_model):
        raise ValueError(f"load_hf: `ssm_cfg.d_ssm`={ssm['d_ssm']} must be None or expand·d_model = {expand * d_model}")
    if ssm.get("D_has_hdim", False) or not ssm.get("rmsnorm", True):
        raise ValueError("load_hf: `ssm_cfg.D_has_hdim` true or `ssm_cfg.rmsnorm` false is not supported")
    a_min, a_max = (float(x) for x in ssm.get("A_init_range", (1.0, 16.0)))
    dt_limit_min, dt_limit_max = _dt_limit({"time_step_limit": ssm.get("dt_limit", (0.0, math.inf))})
    return dict(
        vocab_size=int(_require(raw, "vocab_size")), d_model=d_model, n_layer=int(_require(raw, "n_layer")),
        d_state=int(ssm.get("d_state", 128)), d_conv=int(ssm.get("d_conv", 4)), expand=expand,
        head_dim=int(ssm.get("headdim", 64)), n_groups=int(ssm.get("ngroups", 1)), A_init_min=a_min,
        A_init_max=a_max, dt_min=float(ssm.get("dt_min", 1e-3)), dt_max=float(ssm.get("dt_max", 0.1)),
        dt_init_floor=float(ssm.get("dt_init_floor", 1e-4)), dt_limit_min=dt_limit_min,
        dt_limit_max=dt_limit_max, conv_bias=bool(ssm.get("conv_bias", True)), bias=bool(ssm.get("bias", False)),
        norm_before_gate=bool(ssm.get("norm_before_gate", False)), chunk_size=int(ssm.get("chunk_size", 256)),
        rms_norm_eps=float(raw.get("norm_epsilon", 1e-5)), residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        tie_embeddings=bool(raw.get("tie_embeddings", True)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
    )


def config_from_hf(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of Mamba2Config from an HF transformers `Mamba2Config` dict (config.json), or from
    an official state-spaces one (see `config_from_official`).

    Missing optional keys take transformers' defaults. Raises ValueError naming the key for settings
    Mamba2LM cannot reproduce (e.g. num_heads·head_dim != expand·hidden_size, hidden_act != silu).
    """
    if is_official_mamba2(raw):
        return config_from_official(raw)
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"load_hf: config.json `model_type` must be 'mamba2'; got {raw['model_type']!r}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"load_hf: config.json `hidden_act` must be 'silu' (the only Mamba-2 activation); got {act!r}")
    if raw.get("norm_before_gate", False):
        raise ValueError("load_hf: config.json `norm_before_gate` is true; HF Mamba-2 always normalises after gating")
    d_model = int(_require(raw, "hidden_size"))
    expand = int(raw.get("expand", 2))
    head_dim = int(raw.get("head_dim", 64))
    num_heads = int(raw.get("num_heads", 128))
    if num_heads * head_dim != expand * d_model:
        raise ValueError(f"load_hf: config.json `num_heads`·`head_dim` = {num_heads}·{head_dim} must equal "
                         f"expand·hidden_size = {expand}·{d_model}")
    n_groups = int(raw.get("n_groups", 8))
    if n_groups < 1 or num_heads % n_groups:
        raise ValueError(f"load_hf: config.json `n_groups`={n_groups} must divide `num_heads`={num_heads}")
    if "intermediate_size" in raw and int(raw["intermediate_size"]) != expand * d_model:
        raise ValueError(f"load_hf: config.json `intermediate_size`={raw['intermediate_size']} must equal "
                         f"expand·hidden_size = {expand}·{d_model}")
    dt_limit_min, dt_limit_max = _dt_limit(raw)
    return dict(
        vocab_size=int(_require(raw, "vocab_size")),
        d_model=d_model,
        n_layer=int(_require(raw, "num_hidden_layers")),
        d_state=int(raw.get("state_size", 128)),
        d_conv=int(raw.get("conv_kernel", 4)),
        expand=expand,
        head_dim=head_dim,
        n_groups=n_groups,
        dt_min=float(raw.get("time_step_min", 1e-3)),
        dt_max=float(raw.get("time_step_max", 0.1)),
        dt_init_floor=float(raw.get("time_step_floor", 1e-4)),
        dt_limit_min=dt_limit_min,
        dt_limit_max=dt_limit_max,
        conv_bias=bool(raw.get("use_conv_bias", True)),
        bias=bool(raw.get("use_bias", False)),
        norm_before_gate=False,
        chunk_size=int(raw.get("chunk_size", 256)),
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        gated_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
        initializer_range=float(raw.get("initializer_range", 0.1)),
    )


def config_to_hf(config: Mamba2Config) -> Dict[str, Any]:
    """The HF transformers config.json dict (model_type "mamba2", Mamba2ForCausalLM) for `config`.

    Raises ValueError for configs transformers' Mamba2 cannot express (norm_before_gate, an MLP).
    """
    if config.norm_before_gate:
        raise ValueError("save_hf: `norm_before_gate`=True has no HF Mamba-2 equivalent (HF normalises after gating)")
    if config.gated_norm_eps != config.rms_norm_eps:
        raise ValueError(f"save_hf: HF Mamba-2 uses one epsilon (layer_norm_epsilon) for every norm; this config has "
                         f"rms_norm_eps={config.rms_norm_eps} and gated_norm_eps={config.gated_norm_eps} "
                         "(use mamba_jax.interop.save_pretrained, or make them equal)")
    if config.mlp_width:
        raise ValueError(f"save_hf: `d_intermediate`={config.d_intermediate} (an MLP per layer) has no HF Mamba-2 "
                         "equivalent; use mamba_jax.interop.save_pretrained")
    out = {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "state_size": config.d_state,
        "num_hidden_layers": config.n_layer,
        "expand": config.expand,
        "num_heads": config.n_heads,
        "head_dim": config.head_dim,
        "n_groups": config.n_groups,
        "conv_kernel": config.d_conv,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "hidden_act": "silu",
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "chunk_size": config.chunk_size,
        "layer_norm_epsilon": config.rms_norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "rescale_prenorm_residual": False,
        "use_cache": True,
        "dtype": config.param_dtype,
    }
    if (config.dt_limit_min, config.dt_limit_max) != (0.0, None):
        # Omitted at the default (0, inf), so the file stays strict JSON; otherwise an infinite upper limit is
        # written as `Infinity`, which Python's json (and so transformers) reads.
        out["time_step_limit"] = [config.dt_limit_min,
                                  math.inf if config.dt_limit_max is None else config.dt_limit_max]
    return out


def tensor_specs(config: Mamba2Config) -> Tuple[TensorSpec, ...]:
    """Every tensor of the HF Mamba-2 layout except the embedding and the head (the generic code's)."""
    d, di, h, k, cdim = config.d_model, config.d_inner, config.n_heads, config.d_conv, config.conv_dim
    proj = 2 * di + 2 * config.n_groups * config.d_state + h
    specs = []
    for i in range(config.n_layer):
        t, o = f"backbone.layers.{i}.", (f"layers_{i}",)
        m, om = t + "mixer.", o + ("mixer",)
        specs.append(TensorSpec(t + "norm.weight", (d,), o + ("norm", "weight"), keep, keep))
        # the fused in_proj [z | x | B | C | dt] and conv over [x | B | C] <-> our pieces (`Mamba2Mixer`)
        pieces = ("in_proj_zx", "in_proj_bc", "in_proj_dt")
        specs.append(TensorSpec(
            m + "in_proj.weight", (proj, d), tuple(om + (p, "kernel") for p in pieces),
            lambda w: tuple(v["kernel"] for v in split_in_proj(w.T, None, config).values()),
            lambda *ks: fused_in_proj({p: {"kernel": k} for p, k in zip(pieces, ks)}, config)[0].T))
        if config.bias:
            specs.append(TensorSpec(
                m + "in_proj.bias", (proj,), tuple(om + (p, "bias") for p in pieces),
                lambda b: tuple(v["bias"] for v in split_in_proj(None, b, config).values()),
                lambda *bs: np.concatenate([b.reshape(-1) for b in bs])))
        convs = ("conv1d_x_kernel", "conv1d_bc_kernel")
        specs.append(TensorSpec(m + "conv1d.weight", (cdim, 1, k), tuple(om + (c,) for c in convs),
                                lambda w: tuple(split_conv(conv_to_ours(w), None, config).values()),
                                lambda *ks: conv_to_torch(fused_conv(dict(zip(convs, ks)), config)[0])))
        if config.conv_bias:
            biases = ("conv1d_x_bias", "conv1d_bc_bias")
            specs.append(TensorSpec(m + "conv1d.bias", (cdim,), tuple(om + (c,) for c in biases),
                                    lambda b: tuple(split_conv(None, b, config).values()),
                                    lambda *bs: np.concatenate(bs)))
        for name in ("dt_bias", "A_log", "D"):
            specs.append(TensorSpec(m + name, (h,), om + (name,), keep, keep))
        specs.append(TensorSpec(m + "norm.weight", (di,), om + ("norm_weight",), keep, keep))
        specs.append(TensorSpec(m + "out_proj.weight", (d, di), om + ("out_proj", "kernel"), transpose, transpose))
        if config.bias:
            specs.append(TensorSpec(m + "out_proj.bias", (d,), om + ("out_proj", "bias"), keep, keep))
    specs.append(TensorSpec("backbone.norm_f.weight", (d,), ("norm_f", "weight"), keep, keep))
    return tuple(specs)


FAMILY = HFFamily(model_type=MODEL_TYPE, model_cls=Mamba2LM, config_from_hf=config_from_hf,
                  config_to_hf=config_to_hf, tensor_specs=tensor_specs, embed_name=EMBED_HF, head_name=LM_HEAD,
                  embed_aliases=(EMBED_OFFICIAL,))
