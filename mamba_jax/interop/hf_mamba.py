"""HF transformers Mamba (`model_type: "mamba"`, `MambaForCausalLM`) and the official state-spaces Mamba-1
layout <-> MambaLM. `FAMILY` is what `mamba_jax.interop.hf.load_hf/save_hf` dispatch to for Mamba-1.

Two config flavours are understood:

- HF transformers `MambaConfig` (`model_type: "mamba"`): hidden_size, state_size, num_hidden_layers,
  vocab_size, expand, conv_kernel, use_bias, use_conv_bias, time_step_rank, layer_norm_epsilon, ...
- the official state-spaces config: d_model, n_layer, vocab_size, ssm_cfg {d_state, d_conv, expand,
  dt_rank, ...}, rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings.

Tensor names (torch layout; our layout in brackets):

    backbone.embeddings.weight (HF) / backbone.embedding.weight (official)  (V, d)  [embeddings.embedding (Vp, d)]
    backbone.layers.{i}.norm.weight                  (d,)                  [layers_{i}.norm.weight]
    backbone.layers.{i}.mixer.in_proj.weight         (2·di, d)             [in_proj.kernel (2, d, di): x, z]
    backbone.layers.{i}.mixer.in_proj.bias           (2·di,)  if use_bias  [in_proj.bias (2, di)]
    backbone.layers.{i}.mixer.conv1d.weight          (di, 1, k)            [conv1d_kernel (k, di)]
    backbone.layers.{i}.mixer.conv1d.bias            (di,)    if conv bias [conv1d_bias]
    backbone.layers.{i}.mixer.x_proj.weight          (r + 2n, di)          [x_proj.kernel (di, r + 2n)]
    backbone.layers.{i}.mixer.dt_proj.weight         (di, r)               [dt_proj_kernel (r, di)]
    backbone.layers.{i}.mixer.dt_proj.bias           (di,)                 [dt_proj_bias]
    backbone.layers.{i}.mixer.A_log                  (di, n)
    backbone.layers.{i}.mixer.D                      (di,)
    backbone.layers.{i}.mixer.out_proj.weight        (d, di)               [out_proj.kernel (di, d)]
    backbone.layers.{i}.mixer.out_proj.bias          (d,)     if use_bias
    backbone.norm_f.weight                           (d,)
    lm_head.weight                                   (V, d)   untied only  [lm_head.kernel (d, Vp)]

V is `vocab_size` (HF) or the padded vocabulary (official); our tables have Vp = `padded_vocab_size` rows,
the extra rows zero.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

from mamba_jax.interop.hf_common import (EMBED_HF, EMBED_OFFICIAL, LM_HEAD, HFFamily, TensorSpec, _require,
                                         conv_to_ours, conv_to_torch, keep, official_ssm_cfg, transpose)
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.models.mamba import MambaLM

__all__ = ["FAMILY", "config_from_dict", "config_to_hf_dict", "tensor_specs"]


_OFFICIAL_SSM_IGNORED = ("dt_init", "use_fast_path", "layer_idx", "device", "dtype")


_OFFICIAL_SSM_USED = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor",
                      "dt_scale", "conv_bias", "bias", "layer")


def _config_from_hf(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of MambaConfig from an HF transformers `MambaConfig` dict."""
    if raw.get("model_type", "mamba") != "mamba":
        raise ValueError(f"load_hf: config.json `model_type` must be 'mamba' (Mamba-1); got {raw['model_type']!r}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"load_hf: config.json `hidden_act` must be 'silu' (the only Mamba activation); got {act!r}")
    d_model = int(_require(raw, "hidden_size", "HF"))
    expand = int(raw.get("expand", 2))
    if "intermediate_size" in raw and int(raw["intermediate_size"]) != expand * d_model:
        raise ValueError(f"load_hf: config.json `intermediate_size`={raw['intermediate_size']} must equal "
                         f"expand·hidden_size = {expand}·{d_model}")
    return dict(
        vocab_size=int(_require(raw, "vocab_size", "HF")),
        d_model=d_model,
        n_layer=int(_require(raw, "num_hidden_layers", "HF")),
        d_state=int(raw.get("state_size", 16)),
        d_conv=int(raw.get("conv_kernel", 4)),
        expand=expand,
        dt_rank=raw.get("time_step_rank", "auto"),
        dt_min=float(raw.get("time_step_min", 1e-3)),
        dt_max=float(raw.get("time_step_max", 0.1)),
        dt_init_floor=float(raw.get("time_step_floor", 1e-4)),
        dt_scale=float(raw.get("time_step_scale", 1.0)),
        conv_bias=bool(raw.get("use_conv_bias", True)),
        bias=bool(raw.get("use_bias", False)),
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
        initializer_range=float(raw.get("initializer_range", 0.1)),
    )


def _config_from_official(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of MambaConfig from a state-spaces `MambaConfig` dict."""
    ssm = official_ssm_cfg(raw, _OFFICIAL_SSM_USED + _OFFICIAL_SSM_IGNORED, "MambaLM")
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"load_hf: only Mamba-1 checkpoints are supported; `ssm_cfg.layer` is {ssm['layer']!r}")
    return dict(
        vocab_size=int(_require(raw, "vocab_size", "official")),
        d_model=int(_require(raw, "d_model", "official")),
        n_layer=int(_require(raw, "n_layer", "official")),
        d_state=int(ssm.get("d_state", 16)),
        d_conv=int(ssm.get("d_conv", 4)),
        expand=int(ssm.get("expand", 2)),
        dt_rank=ssm.get("dt_rank", "auto"),
        dt_min=float(ssm.get("dt_min", 1e-3)),
        dt_max=float(ssm.get("dt_max", 0.1)),
        dt_init_floor=float(ssm.get("dt_init_floor", 1e-4)),
        dt_scale=float(ssm.get("dt_scale", 1.0)),
        conv_bias=bool(ssm.get("conv_bias", True)),
        bias=bool(ssm.get("bias", False)),
        rms_norm_eps=float(raw.get("norm_epsilon", 1e-5)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        tie_embeddings=bool(raw.get("tie_embeddings", True)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
    )


def config_from_dict(raw: Mapping[str, Any], **overrides) -> MambaConfig:
    """A MambaConfig from a parsed config.json (HF or official flavour), with `overrides` applied.

    The flavour is the official one when the dict has `d_model` and no `hidden_size`.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"config_from_dict: `raw` must be a dict parsed from config.json; got {type(raw).__name__}")
    official = "d_model" in raw and "hidden_size" not in raw
    kwargs = _config_from_official(raw) if official else _config_from_hf(raw)
    if isinstance(kwargs["dt_rank"], str) and kwargs["dt_rank"] != "auto":
        raise ValueError(f"load_hf: config.json dt_rank must be 'auto' or an int; got {kwargs['dt_rank']!r}")
    if not isinstance(kwargs["dt_rank"], str):
        kwargs["dt_rank"] = int(kwargs["dt_rank"])
    kwargs.update(overrides)
    return MambaConfig(**kwargs)


def config_to_hf_dict(config: MambaConfig) -> Dict[str, Any]:
    """The HF transformers config.json dict (model_type "mamba") for `config`."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "state_size": config.d_state,
        "num_hidden_layers": config.n_layer,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "conv_kernel": config.d_conv,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "hidden_act": "silu",
        "time_step_rank": config.dt_rank_value,
        "time_step_scale": config.dt_scale,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "time_step_init_scheme": "random",
        "layer_norm_epsilon": config.rms_norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "rescale_prenorm_residual": False,
        "use_cache": True,
        "dtype": config.param_dtype,
    }


def tensor_specs(config: MambaConfig) -> Tuple[TensorSpec, ...]:
    """Every tensor of the HF layout except the embedding and the head (their rows vary; see below)."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank_value, config.d_conv
    specs = []
    for i in range(config.n_layer):
        t, o = f"backbone.layers.{i}.", (f"layers_{i}",)
        m, om = t + "mixer.", o + ("mixer",)
        specs.append(TensorSpec(t + "norm.weight", (d,), o + ("norm", "weight"), keep, keep))
        # [x | z] rows <-> the (2, d, di) kernel of pieces (`MambaMixer`, `layers.mamba.split_in_proj`)
        specs.append(TensorSpec(m + "in_proj.weight", (2 * di, d), om + ("in_proj", "kernel"),
                                lambda w: w.reshape(2, di, d).transpose(0, 2, 1),
                                lambda k: k.transpose(0, 2, 1).reshape(2 * di, d)))
        if config.bias:
            specs.append(TensorSpec(m + "in_proj.bias", (2 * di,), om + ("in_proj", "bias"),
                                    lambda b: b.reshape(2, di), lambda b: b.reshape(2 * di)))
        specs.append(TensorSpec(m + "conv1d.weight", (di, 1, k), om + ("conv1d_kernel",),
                                conv_to_ours, conv_to_torch))
        if config.conv_bias:
            specs.append(TensorSpec(m + "conv1d.bias", (di,), om + ("conv1d_bias",), keep, keep))
        specs.append(TensorSpec(m + "x_proj.weight", (r + 2 * n, di), om + ("x_proj", "kernel"),
                                transpose, transpose))
        specs.append(TensorSpec(m + "dt_proj.weight", (di, r), om + ("dt_proj_kernel",), transpose, transpose))
        specs.append(TensorSpec(m + "dt_proj.bias", (di,), om + ("dt_proj_bias",), keep, keep))
        specs.append(TensorSpec(m + "A_log", (di, n), om + ("A_log",), keep, keep))
        specs.append(TensorSpec(m + "D", (di,), om + ("D",), keep, keep))
        specs.append(TensorSpec(m + "out_proj.weight", (d, di), om + ("out_proj", "kernel"), transpose, transpose))
        if config.bias:
            specs.append(TensorSpec(m + "out_proj.bias", (d,), om + ("out_proj", "bias"), keep, keep))
    specs.append(TensorSpec("backbone.norm_f.weight", (d,), ("norm_f", "weight"), keep, keep))
    return tuple(specs)


def _mamba_config_kwargs(raw: Mapping[str, Any]) -> Dict[str, Any]:
    return dataclasses.asdict(config_from_dict(raw))


FAMILY = HFFamily("mamba", MambaLM, _mamba_config_kwargs, config_to_hf_dict, tensor_specs, EMBED_HF,
                        LM_HEAD, (EMBED_OFFICIAL,))

MAMBA_FAMILY = FAMILY
