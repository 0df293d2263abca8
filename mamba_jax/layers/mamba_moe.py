"""The parallel MoE-Mamba block ("P" in `HybridConfig.pattern`): a Mamba layer and an MoE feed-forward
layer side by side on the same normed input, outputs summed (the MoE-Mamba paper's parallel ablation):

    h = h + Mamba(norm(h)) + MoE(norm(h))

against the sequential block pair "M E": h = h + Mamba(norm(h)); h = h + MoE(norm'(h)).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

import flax.linen as nn

from mamba_jax.layers.config import MAMBA_MOE, BaseLMConfig
from mamba_jax.layers.mamba import LayerCache, MambaConfig, MambaMixer, init_layer_cache
from mamba_jax.layers.moe import MoEBlockConfig, MoEMixer


@dataclasses.dataclass(frozen=True)
class ParallelMambaMoEConfig(BaseLMConfig):
    """The config of a "P" layer: `mamba` (the Mamba-1 sublayer) and `moe` (the MoE sublayer); their
    common fields (width, dtypes, ...) are this config's. Built by `HybridConfig.mixer_config("P")`."""

    family: ClassVar[str] = "mamba_moe"

    mamba: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    moe: MoEBlockConfig = dataclasses.field(default_factory=MoEBlockConfig)

    def __post_init__(self):
        super().__post_init__()
        for name, cls in (("mamba", MambaConfig), ("moe", MoEBlockConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"ParallelMambaMoEConfig: `{name}` must be a {cls.__name__}; "
                                 f"got {type(getattr(self, name)).__name__}")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (MAMBA_MOE,) * self.n_layer


class ParallelMambaMoE(nn.Module):
    """``(x, positions, seq_idx, mask, cache) -> (Mamba(x) + MoE(x), cache)``: x (b, l, d_model); the output
    is in the Mamba layer's dtype; cache: the Mamba layer's `LayerCache` (the MoE layer is token-wise).
    Params: ``mamba`` (a `MambaMixer`) and ``moe`` (a `MoEMixer`, which sows its router loss and metrics as
    an "E" layer does; `deterministic=False` trains it)."""

    config: ParallelMambaMoEConfig

    @nn.compact
    def __call__(self, x, *, positions=None, seq_idx=None, mask=None, cache=None, deterministic: bool = True,
                 step_caches: bool = False):
        y_mamba, cache = MambaMixer(self.config.mamba, name="mamba")(
            x, positions=positions, seq_idx=seq_idx, mask=mask, cache=cache, step_caches=step_caches)
        y_moe, _ = MoEMixer(self.config.moe, name="moe")(x, positions=positions, seq_idx=seq_idx, mask=mask,
                                                         deterministic=deterministic)
        return y_mamba + y_moe.astype(y_mamba.dtype), cache


def init_parallel_cache(config: ParallelMambaMoEConfig, batch_size: int, max_len: Optional[int] = None) -> LayerCache:
    """The zero cache of a "P" layer: its Mamba sublayer's `LayerCache`."""
    return init_layer_cache(config.mamba, batch_size, max_len)
