"""Load and save checkpoints in the HF transformers layouts (Mamba, Mamba-2, Llama) and the official
state-spaces Mamba-1 layout. `load_hf` picks the family from config.json's `model_type` (an `HFFamily`
per family: this module holds Mamba-1's, `hf_mamba2` and `hf_llama` the others); our own format
(`native.save_pretrained`, for hybrids) is read too.

Only safetensors files are read or written (no pickle). A checkpoint directory holds `config.json` and
either `model.safetensors` or shards listed in `model.safetensors.index.json`.

Two config flavours are understood:

- HF transformers `MambaConfig` (`model_type: "mamba"`): hidden_size, state_size, num_hidden_layers,
  vocab_size, expand, conv_kernel, use_bias, use_conv_bias, time_step_rank, layer_norm_epsilon, ...
- the official state-spaces config: d_model, n_layer, vocab_size, ssm_cfg {d_state, d_conv, expand,
  dt_rank, ...}, rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings.

Tensor names (torch layout; our layout in brackets):

    backbone.embeddings.weight (HF) / backbone.embedding.weight (official)  (V, d)  [embeddings.embedding (Vp, d)]
    backbone.layers.{i}.norm.weight                  (d,)                  [layers_{i}.norm.weight]
    backbone.layers.{i}.mixer.in_proj.weight         (2·di, d)             [in_proj.kernel (d, 2·di)]
    backbone.layers.{i}.mixer.in_proj.bias           (2·di,)  if use_bias
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
import json
import os
from typing import Any, Callable, Dict, Mapping, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mamba_jax.layers import MambaConfig
from mamba_jax.layers.config import cast_params
from mamba_jax.models.mamba import MambaLM

__all__ = ["HFFamily", "TensorSpec", "config_from_dict", "config_to_hf_dict", "families", "load_hf",
           "params_from_torch_tensors", "params_to_torch_tensors", "read_safetensors", "save_hf", "tensor_specs"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
EMBED_HF = "backbone.embeddings.weight"
EMBED_OFFICIAL = "backbone.embedding.weight"
LM_HEAD = "lm_head.weight"
NATIVE_MODEL_TYPE = "mamba_jax"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# ssm_cfg keys of the official Mamba-1 block that do not change the forward computation.
_OFFICIAL_SSM_IGNORED = ("dt_init", "use_fast_path", "layer_idx", "device", "dtype")
_OFFICIAL_SSM_USED = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor",
                      "dt_scale", "conv_bias", "bias", "layer")


# --------------------------------------------------------------------------------------------------
# config.json <-> MambaConfig
# --------------------------------------------------------------------------------------------------

def _require(raw: Mapping[str, Any], key: str, where: str):
    if key not in raw:
        raise ValueError(f"load_hf: {where} config.json has no `{key}`")
    return raw[key]


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


def official_ssm_cfg(raw: Mapping[str, Any], known_keys, model_name: str) -> Dict[str, Any]:
    """The `ssm_cfg` of an official state-spaces config.json, after refusing what `model_name` cannot
    reproduce: unknown ssm_cfg keys, attention layers (`attn_layer_idx`), MLPs (`d_intermediate`), LayerNorm."""
    ssm = dict(raw.get("ssm_cfg") or {})
    unknown = sorted(set(ssm) - set(known_keys))
    if unknown:
        raise ValueError(f"load_hf: config.json `ssm_cfg` has keys this loader does not understand: {unknown}")
    if raw.get("attn_layer_idx"):
        raise ValueError(f"load_hf: hybrid checkpoints (non-empty `attn_layer_idx`) are not supported by {model_name}")
    if raw.get("d_intermediate", 0):
        raise ValueError(f"load_hf: checkpoints with MLP blocks (`d_intermediate` > 0) are not supported by {model_name}")
    if not raw.get("rms_norm", True):
        raise ValueError(f"load_hf: config.json `rms_norm` is false (LayerNorm); {model_name} supports RMSNorm only")
    return ssm


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


# --------------------------------------------------------------------------------------------------
# The name map: one entry per torch tensor
# --------------------------------------------------------------------------------------------------

class TensorSpec(NamedTuple):
    """One checkpoint tensor: its torch name and shape, where it goes in our tree, and how to convert.

    to_ours / to_torch: numpy functions between the torch layout and ours (transpose, reshape).
    """

    name: str
    torch_shape: Tuple[int, ...]
    path: Tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def keep(x):
    return x


def transpose(x):
    return np.ascontiguousarray(x.T)


def conv_to_ours(w):  # (di, 1, k) -> (k, di)
    return np.ascontiguousarray(w[:, 0, :].T)


def conv_to_torch(w):  # (k, di) -> (di, 1, k)
    return np.ascontiguousarray(w.T[:, None, :])


def tensor_specs(config: MambaConfig) -> Tuple[TensorSpec, ...]:
    """Every tensor of the HF layout except the embedding and the head (their rows vary; see below)."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank_value, config.d_conv
    specs = []
    for i in range(config.n_layer):
        t, o = f"backbone.layers.{i}.", (f"layers_{i}",)
        m, om = t + "mixer.", o + ("mixer",)
        specs.append(TensorSpec(t + "norm.weight", (d,), o + ("norm", "weight"), keep, keep))
        specs.append(TensorSpec(m + "in_proj.weight", (2 * di, d), om + ("in_proj", "kernel"),
                                transpose, transpose))
        if config.bias:
            specs.append(TensorSpec(m + "in_proj.bias", (2 * di,), om + ("in_proj", "bias"), keep, keep))
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


def _set_path(tree: Dict[str, Any], path: Tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping[str, Any], path: Tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _pad_rows(table: np.ndarray, rows: int) -> np.ndarray:
    """(V, d) -> (rows, d) with zero rows appended."""
    if table.shape[0] == rows:
        return table
    return np.concatenate([table, np.zeros((rows - table.shape[0],) + table.shape[1:], table.dtype)], axis=0)


def _vocab_table(tensors: Mapping[str, np.ndarray], name: str, config) -> np.ndarray:
    """Check a (V, d) embedding/head table, V ∈ {vocab_size, padded_vocab_size}, and pad it to (Vp, d)."""
    table = tensors[name]
    allowed = sorted({config.vocab_size, config.padded_vocab_size})
    if table.ndim != 2 or table.shape[1] != config.d_model or table.shape[0] not in allowed:
        raise ValueError(f"load_hf: tensor `{name}` has shape {tuple(table.shape)}; expected "
                         f"(V, {config.d_model}) with V in {allowed} (vocab_size or padded vocab)")
    return _pad_rows(np.asarray(table), config.padded_vocab_size)


class HFFamily(NamedTuple):
    """How one model family maps to an HF transformers checkpoint.

    model_type: config.json `model_type` read and written; model_cls: our model class (its
    `config_type` is the config class); config_from_hf: config.json dict -> keyword arguments of the
    config class (ValueError for unsupported settings); config_to_hf: our config -> config.json dict;
    tensor_specs: every tensor except the embedding and the head; embed_name / head_name: those two
    (written with `embed_name`; `embed_aliases` are also accepted when reading).
    """

    model_type: str
    model_cls: type
    config_from_hf: Callable[[Mapping[str, Any]], Dict[str, Any]]
    config_to_hf: Callable[[Any], Dict[str, Any]]
    tensor_specs: Callable[[Any], Tuple[TensorSpec, ...]]
    embed_name: str
    head_name: str = LM_HEAD
    embed_aliases: Tuple[str, ...] = ()


def _mamba_config_kwargs(raw: Mapping[str, Any]) -> Dict[str, Any]:
    return dataclasses.asdict(config_from_dict(raw))


MAMBA_FAMILY = HFFamily("mamba", MambaLM, _mamba_config_kwargs, config_to_hf_dict, tensor_specs, EMBED_HF,
                        LM_HEAD, (EMBED_OFFICIAL,))


_OTHER_FAMILIES = ("mamba_jax.interop.hf_mamba2", "mamba_jax.interop.hf_llama")


def families() -> Tuple[HFFamily, ...]:
    """Every HF family load_hf/save_hf understand (imported lazily: their modules import this one)."""
    import importlib
    return (MAMBA_FAMILY,) + tuple(importlib.import_module(name).FAMILY for name in _OTHER_FAMILIES)


def family_for_config(raw: Mapping[str, Any]) -> HFFamily:
    """The family of a parsed config.json: by `model_type`; a dict with `d_model` and no model_type is an
    official state-spaces config (Mamba-2 when `ssm_cfg.layer` is "Mamba2", else Mamba-1)."""
    model_type = raw.get("model_type")
    from mamba_jax.interop.hf_mamba2 import FAMILY as MAMBA2_FAMILY, is_official_mamba2
    if is_official_mamba2(raw):
        return MAMBA2_FAMILY
    if (model_type is None and "d_model" in raw) or model_type == MAMBA_FAMILY.model_type:
        return MAMBA_FAMILY
    for family in families():
        if family.model_type == model_type:
            return family
    known = [f.model_type for f in families()] + [NATIVE_MODEL_TYPE]
    raise ValueError(f"load_hf: config.json `model_type` is {model_type!r}; supported: {known}")


def family_for_model(model, fn: str) -> HFFamily:
    if type(model) is MambaLM:
        if model.config.bc_source != "conv":
            raise ValueError(f"{fn}: MambaConfig(bc_source={model.config.bc_source!r}) (the attention-initialised "
                             "Mamba-1 form) has no HF layout (MambaForCausalLM has x_proj); use "
                             "mamba_jax.interop.save_pretrained")
        return MAMBA_FAMILY
    for family in families():
        if type(model) is family.model_cls:
            return family
    raise ValueError(f"{fn}: no HF format for {type(model).__name__}; use mamba_jax.interop.save_pretrained")


def params_from_torch_tensors(tensors: Mapping[str, np.ndarray], config, param_dtype: Any = np.float32,
                              family: HFFamily = MAMBA_FAMILY) -> Dict[str, Any]:
    """Our parameter tree from torch-named tensors of `family`, in `param_dtype` (A_log, D and the Δ bias in
    float32, as the model creates them: `cast_params`).

    Accepts the family's embedding name or an alias. Raises ValueError naming every missing tensor, a
    tensor with the wrong shape (got vs expected), or every unused tensor. With tied embeddings a present
    head must equal the embedding.
    """
    names = set(tensors)
    embed_names = [x for x in (family.embed_name,) + family.embed_aliases if x in names]
    if len(embed_names) > 1:
        raise ValueError(f"load_hf: the checkpoint has more than one embedding tensor {embed_names}; expected one")
    specs = family.tensor_specs(config)
    required = [s.name for s in specs] + (embed_names or [family.embed_name])
    if not config.tie_embeddings:
        required.append(family.head_name)
    missing = [x for x in required if x not in names]
    if missing:
        raise ValueError(f"load_hf: the checkpoint is missing tensor(s) {missing} (config: n_layer={config.n_layer}, "
                         f"tie_embeddings={config.tie_embeddings}, {type(config).__name__})")
    optional = [family.head_name] if config.tie_embeddings else []
    unused = sorted(names - set(required) - set(optional))
    if unused:
        raise ValueError(f"load_hf: the checkpoint has tensor(s) the model does not use: {unused}")

    cast = np.asarray
    params: Dict[str, Any] = {}
    for spec in specs:
        value = tensors[spec.name]
        if tuple(value.shape) != spec.torch_shape:
            raise ValueError(f"load_hf: tensor `{spec.name}` has shape {tuple(value.shape)}; "
                             f"expected {spec.torch_shape}")
        _set_path(params, spec.path, cast(spec.to_ours(np.asarray(value))))
    embedding = _vocab_table(tensors, embed_names[0], config)
    _set_path(params, ("embeddings", "embedding"), cast(embedding))
    if config.tie_embeddings:
        if family.head_name in names:
            head = _vocab_table(tensors, family.head_name, config)
            if not np.array_equal(head, embedding):
                raise ValueError(f"load_hf: config says the embeddings are tied but `{family.head_name}` differs "
                                 f"from `{embed_names[0]}`; set tie_word_embeddings/tie_embeddings to false")
    else:
        _set_path(params, ("lm_head", "kernel"), cast(transpose(_vocab_table(tensors, family.head_name, config))))
    return jax.tree_util.tree_map(np.asarray, cast_params(params, param_dtype))


def params_to_torch_tensors(params: Mapping[str, Any], config, family: HFFamily = MAMBA_FAMILY
                            ) -> Dict[str, np.ndarray]:
    """HF-named numpy tensors (torch layout, vocab rows unpadded, dtype kept) from our parameter tree."""
    out = {}
    for spec in family.tensor_specs(config):
        out[spec.name] = spec.to_torch(np.asarray(_get_path(params, spec.path)))
    out[family.embed_name] = np.ascontiguousarray(np.asarray(params["embeddings"]["embedding"])[:config.vocab_size])
    if not config.tie_embeddings:
        out[family.head_name] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T[:config.vocab_size])
    return out


def check_param_tree(params, model, fn: str, example_inputs=None) -> None:
    """Raise ValueError unless `params` has exactly the structure and shapes that `model.init` gives
    (on `example_inputs`, default one row of two token ids)."""
    example_inputs = (jnp.zeros((1, 2), jnp.int32),) if example_inputs is None else tuple(example_inputs)
    expected = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *example_inputs)["params"]))
    flat_exp = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if set(flat_exp) != set(flat_got):
        raise ValueError(f"{fn}: parameter names differ from the model's: missing "
                         f"{sorted(set(flat_exp) - set(flat_got))}, unexpected {sorted(set(flat_got) - set(flat_exp))}")
    for key, shape in flat_exp.items():
        if tuple(flat_got[key]) != tuple(shape):
            raise ValueError(f"{fn}: parameter {key} has shape {tuple(flat_got[key])}; expected {tuple(shape)}")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def _safetensors_files(path: str) -> Tuple[str, ...]:
    """The safetensors file(s) of a checkpoint directory (the shards of an index, or model.safetensors)."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_hf: {index} has no `weight_map`")
        return tuple(os.path.join(path, shard) for shard in sorted(set(weight_map.values())))
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return (single,)
    pickled = sorted(x for x in os.listdir(path) if x.endswith(_PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"load_hf: {path} holds only pickle checkpoint(s) {pickled}; pickle files are not loaded (unpickling "
            "runs arbitrary code). Convert once to safetensors, e.g. with transformers: "
            "`MambaForCausalLM.from_pretrained(path).save_pretrained(out_dir, safe_serialization=True)`, or "
            "`safetensors.torch.save_file(torch.load(bin, weights_only=True), 'model.safetensors')`")
    raise ValueError(f"load_hf: {path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bf16 as ml_dtypes.bfloat16), name -> array."""
    tensors: Dict[str, np.ndarray] = {}
    for file in _safetensors_files(path):
        if not os.path.isfile(file):
            raise ValueError(f"load_hf: shard {file} listed in {INDEX_NAME} does not exist")
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"load_hf: tensor `{name}` appears in more than one shard")
                tensors[name] = f.get_tensor(name)
    return tensors


def read_config(path, fn: str = "load_hf") -> Dict[str, Any]:
    """The parsed config.json of a checkpoint directory (ValueError when there is none)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{fn}: `path` must be a checkpoint directory; {path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"{fn}: {path} has no {CONFIG_NAME}")
    with open(config_file) as f:
        return json.load(f)


def unbox_params(params):
    """Accept params, boxed params, or {"params": params}; return the plain tree."""
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def load_hf(path, *, dtype: str = "float32", param_dtype: str = "float32", **config_overrides):
    """Load a checkpoint directory: HF transformers Mamba, Mamba-2 or Llama, an official state-spaces
    Mamba-1 checkpoint, or one of ours (`save_pretrained`, e.g. a hybrid).

    Args:
      path: directory with config.json and model.safetensors (or model.safetensors.index.json + shards).
      dtype: computation dtype of the returned model ("float32", "bfloat16", "float16", "float64").
      param_dtype: dtype the parameters are cast to.
      config_overrides: other config fields to set, e.g. `scan_impl="reference"` (Mamba-1) or
        `ssd_impl="chunked"` (Mamba-2).
    Returns:
      (model, params): a MambaLM / Mamba2LM / TransformerLM / HybridLM and its parameter tree (jax arrays)
      for `model.apply({"params": params}, ids)`. Embedding (and untied head) rows are zero-padded to
      `padded_vocab_size`; logits keep `vocab_size`.
    Raises:
      ValueError for a missing directory/config, pickle-only checkpoints, unsupported configs, missing,
      misshapen or unused tensors (the message names the tensor).
    """
    raw = read_config(path)
    if raw.get("model_type") == NATIVE_MODEL_TYPE:
        from mamba_jax.interop.native import load_pretrained
        return load_pretrained(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    family = family_for_config(raw)
    config_cls = family.model_cls.config_type
    kwargs = family.config_from_hf(raw)
    kwargs.update(dtype=dtype, param_dtype=param_dtype, **config_overrides)
    config = config_cls(**kwargs)
    host = params_from_torch_tensors(read_safetensors(os.fspath(path)), config,
                                     param_dtype=config.jnp_param_dtype, family=family)
    model = family.model_cls(config)
    check_param_tree(host, model, "load_hf")
    return model, jax.tree_util.tree_map(jnp.asarray, host)


def save_hf(model, params, path) -> None:
    """Write `path`/config.json and `path`/model.safetensors in the HF transformers layout of the model's
    family (MambaLM → MambaForCausalLM, Mamba2LM → Mamba2ForCausalLM, TransformerLM → LlamaForCausalLM).

    Tensors keep the parameter dtype, use torch layouts and HF names, and have `vocab_size` rows (the
    padding rows are dropped); a tied head is not written. transformers' `from_pretrained` and
    `load_hf` both read the result. A HybridLM has no HF layout: use `save_pretrained`.
    """
    family = family_for_model(model, "save_hf")
    params = unbox_params(params)
    check_param_tree(params, model, "save_hf")
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    tensors = params_to_torch_tensors(host, model.config, family)
    write_checkpoint(path, family.config_to_hf(model.config), tensors)


def write_checkpoint(path, config_dict: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """config.json + model.safetensors (metadata format "pt", as transformers expects) in `path`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    save_file(dict(tensors), os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
