"""Checkpoint interop: safetensors load/save in the HF transformers layouts (Mamba, Mamba-2, Llama), the
official state-spaces Mamba-1 layout, and our own format (`save_pretrained`, needed for hybrids)."""
from mamba_jax.interop.hf import (
    HFFamily,
    TensorSpec,
    config_from_dict,
    config_to_hf_dict,
    load_hf,
    params_from_torch_tensors,
    params_to_torch_tensors,
    read_safetensors,
    save_hf,
)
from mamba_jax.interop.native import load_pretrained, save_pretrained

__all__ = ["HFFamily", "TensorSpec", "config_from_dict", "config_to_hf_dict", "load_hf", "load_pretrained",
           "params_from_torch_tensors", "params_to_torch_tensors", "read_safetensors", "save_hf", "save_pretrained"]
