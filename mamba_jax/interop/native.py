"""Our own checkpoint format, for every model (and the only one for hybrids, which HF has no class for).

A directory with config.json — {"model_type": "mamba_jax", "config": config.to_dict()}, so the layer
pattern of a hybrid is part of the checkpoint — and model.safetensors holding our parameter tree in our
layout, one tensor per leaf named by its path ("layers_0.mixer.in_proj.kernel").
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.interop.hf import (NATIVE_MODEL_TYPE, check_param_tree, read_config, read_safetensors,
                                  unbox_params, write_checkpoint)
from mamba_jax.models import HybridLM, Mamba2LM, MambaLM, TransformerLM

MODEL_CLASSES = {cls.config_type.family: cls for cls in (MambaLM, Mamba2LM, TransformerLM, HybridLM)}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = np.ascontiguousarray(np.asarray(jax.device_get(value)))
    return out


def _unflatten(tensors: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for name, value in tensors.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def save_pretrained(model, params, path) -> None:
    """Write `model`'s config and `params` to the directory `path` (created if needed)."""
    if type(model) not in MODEL_CLASSES.values():
        raise ValueError(f"save_pretrained: `model` must be one of {sorted(c.__name__ for c in MODEL_CLASSES.values())}; "
                         f"got {type(model).__name__}")
    params = unbox_params(params)
    check_param_tree(params, model, "save_pretrained")
    write_checkpoint(path, {"model_type": NATIVE_MODEL_TYPE, "config": model.config.to_dict()}, _flatten(params))


def load_pretrained(path, *, dtype: str = "float32", param_dtype: str = "float32", **config_overrides):
    """(model, params) from a `save_pretrained` directory, with the dtypes and config fields given."""
    raw = read_config(path, "load_pretrained")
    if raw.get("model_type") != NATIVE_MODEL_TYPE or not isinstance(raw.get("config"), Mapping):
        raise ValueError(f"load_pretrained: {path} is not a mamba_jax checkpoint (config.json needs "
                         f"model_type {NATIVE_MODEL_TYPE!r} and a `config` dict); for HF checkpoints use load_hf")
    family = raw["config"].get("family")
    if family not in MODEL_CLASSES:
        raise ValueError(f"load_pretrained: config `family` is {family!r}; expected one of {sorted(MODEL_CLASSES)}")
    model_cls = MODEL_CLASSES[family]
    config = model_cls.config_type.from_dict(raw["config"]).replace(
        dtype=dtype, param_dtype=param_dtype, **config_overrides)
    host = _unflatten(read_safetensors(os.fspath(path)))
    model = model_cls(config)
    check_param_tree(host, model, "load_pretrained")
    return model, jax.tree_util.tree_map(lambda x: jnp.asarray(x, config.jnp_param_dtype), host)
