"""Our own checkpoint format, for every model (and the only one for hybrids, which HF has no class for).

A directory with config.json — {"model_type": "mamba_jax", "config": config.to_dict()}, so the layer
pattern of a hybrid is part of the checkpoint — and model.safetensors holding our parameter tree in our
layout, one tensor per leaf named by its path ("layers_0.mixer.in_proj.kernel").
An `InContextRegressor` (in-context regression on any backbone) adds {"task": "in_context_regression",
"d": input width} to config.json.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.interop.hf_common import (NATIVE_MODEL_TYPE, check_param_tree, read_config, read_safetensors,
                                         unbox_params, write_checkpoint)
from mamba_jax.layers.config import cast_params
from mamba_jax.models import HybridLM, Mamba2LM, MambaLM, TransformerLM
from mamba_jax.models.icl import InContextRegressor

MODEL_CLASSES = {cls.config_type.family: cls for cls in (MambaLM, Mamba2LM, TransformerLM, HybridLM)}
ICL_TASK = "in_context_regression"


def _icl_example_inputs(d: int):
    return jnp.zeros((1, 2, d), jnp.float32), jnp.zeros((1, 2), jnp.float32)


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
    """Write `model`'s config and `params` to the directory `path` (created if needed).

    model: a MambaLM, Mamba2LM, TransformerLM, HybridLM or InContextRegressor.
    """
    params = unbox_params(params)
    if isinstance(model, InContextRegressor):
        kernel = params.get("read_in", {}).get("kernel") if isinstance(params, Mapping) else None
        if kernel is None or np.ndim(kernel) != 2:
            raise ValueError("save_pretrained: InContextRegressor params need `read_in.kernel` of shape (d, d_model)")
        d = int(np.shape(kernel)[0])
        check_param_tree(params, model, "save_pretrained", _icl_example_inputs(d))
        meta = {"model_type": NATIVE_MODEL_TYPE, "task": ICL_TASK, "d": d, "config": model.config.to_dict()}
    elif type(model) in MODEL_CLASSES.values():
        check_param_tree(params, model, "save_pretrained")
        meta = {"model_type": NATIVE_MODEL_TYPE, "config": model.config.to_dict()}
    else:
        names = sorted(c.__name__ for c in MODEL_CLASSES.values()) + [InContextRegressor.__name__]
        raise ValueError(f"save_pretrained: `model` must be one of {names}; got {type(model).__name__}")
    write_checkpoint(path, meta, _flatten(params))


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
    task = raw.get("task")
    if task is None:
        model, example = model_cls(config), None
    elif task == ICL_TASK:
        model, example = InContextRegressor(config), _icl_example_inputs(int(raw["d"]))
    else:
        raise ValueError(f"load_pretrained: config.json `task` is {task!r}; expected {ICL_TASK!r} or none")
    check_param_tree(host, model, "load_pretrained", example)
    return model, cast_params(host, config.jnp_param_dtype)
