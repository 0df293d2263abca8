"""Checkpoint interop: safetensors load/save in the HF transformers and official state-spaces layouts."""
from mamba_jax.interop.hf import (
    config_from_dict,
    config_to_hf_dict,
    load_hf,
    params_from_torch_tensors,
    params_to_torch_tensors,
    read_safetensors,
    save_hf,
)

__all__ = ["config_from_dict", "config_to_hf_dict", "load_hf", "params_from_torch_tensors",
           "params_to_torch_tensors", "read_safetensors", "save_hf"]
