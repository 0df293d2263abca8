"""Load and save checkpoints in the HF transformers layouts (Mamba, Mamba-2, Llama) and the official
state-spaces Mamba-1 layout. `load_hf` picks the family from config.json's `model_type` (an `HFFamily`
per family: this module holds Mamba-1's, `hf_mamba2` and `hf_llama` the others); our own format
(`native.save_pretrained`, for hybrids) is read too.

Only safetensors files are read or written (no pickle). A checkpoint directory holds `config.json` and
either `model.safetensors` or shards listed in `model.safetensors.index.json`.

The shared machinery is `hf_common`, each family a module: `hf_mamba` (Mamba-1, HF and official layouts),
`hf_mamba2`, `hf_llama`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.interop import hf_llama, hf_mamba2
from mamba_jax.interop.hf_common import (NATIVE_MODEL_TYPE, HFFamily, TensorSpec, check_param_tree,  # noqa: F401
                                         params_from_torch_tensors, params_to_torch_tensors, read_config,
                                         read_safetensors, unbox_params, write_checkpoint)
from mamba_jax.interop.hf_mamba import MAMBA_FAMILY, config_from_dict, config_to_hf_dict, tensor_specs  # noqa: F401
from mamba_jax.models.mamba import MambaLM

__all__ = ["HFFamily", "TensorSpec", "config_from_dict", "config_to_hf_dict", "families", "load_hf",
           "params_from_torch_tensors", "params_to_torch_tensors", "read_safetensors", "save_hf", "tensor_specs"]


def families() -> Tuple[HFFamily, ...]:
    """Every HF family load_hf/save_hf understand."""
    return (MAMBA_FAMILY, hf_mamba2.FAMILY, hf_llama.FAMILY)


def family_for_config(raw: Mapping[str, Any]) -> HFFamily:
    """The family of a parsed config.json: by `model_type`; a dict with `d_model` and no model_type is an
    official state-spaces config (Mamba-2 when `ssm_cfg.layer` is "Mamba2", else Mamba-1)."""
    model_type = raw.get("model_type")
    if hf_mamba2.is_official_mamba2(raw):
        return hf_mamba2.FAMILY
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


def load_hf(path, *, dtype: str = "float32", param_dtype: str = "float32", **config_overrides):
    """Load a checkpoint directory: HF transformers Mamba, Mamba-2 or Llama, an official state-spaces
    Mamba-1 checkpoint, or one of ours (`save_pretrained`, e.g. a hybrid).

    Args:
      path: directory with config.json and model.safetensors (or model.safetensors.index.json + shards).
      dtype: computation dtype of the returned model ("float32", "bfloat16", "float16", "float64").
      param_dtype: dtype the parameters are cast to.
      config_overrides: other config fields to set, e.g. `scan_impl="reference"` (Mamba-1) or
        `scan_impl="chunked"` (Mamba-2).
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


