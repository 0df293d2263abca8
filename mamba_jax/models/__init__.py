"""Language models built from `mamba_jax.layers`."""
from mamba_jax.layers import MambaConfig
from mamba_jax.models.mamba import LMOutput, MambaBlock, MambaCache, MambaLM, init_cache, init_params, param_axes

__all__ = ["LMOutput", "MambaBlock", "MambaCache", "MambaConfig", "MambaLM", "init_cache", "init_params",
           "param_axes"]
