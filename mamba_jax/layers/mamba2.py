"""The Mamba-2 mixer (state-spaces/mamba's `Mamba2` block) as a Flax Linen module.

Parameter names follow HF transformers' `Mamba2Mixer` (in_proj, conv1d, dt_bias, A_log, D, norm,
out_proj); torch (out, in) weights are stored transposed (in, out).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

from mamba_jax.layers.config import MAMBA2, BaseLMConfig, check_choice, check_positive_int
from mamba_jax.ops.ssd import SSD_IMPLS


@dataclasses.dataclass(frozen=True)
class Mamba2Config(BaseLMConfig):
    """Hyper-parameters of a Mamba-2 language model (defaults: the official `Mamba2` block).

    d_inner = expand · d_model = nheads · headdim; B and C have `ngroups` groups (dividing nheads);
    the conv runs over xBC, conv_dim = d_inner + 2 · ngroups · d_state channels. A = -exp(A_log) with
    A ~ U[A_init_min, A_init_max] per head at init; Δ = softplus(dt + dt_bias), clamped to
    [dt_limit_min, dt_limit_max] (None: no upper limit). The gated RMSNorm normalises each of the
    ngroups groups of d_inner / ngroups channels.
    """

    family: ClassVar[str] = "mamba2"

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0
    dt_limit_max: Optional[float] = None
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    chunk_size: int = 256
    ssd_impl: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            check_positive_int("Mamba2Config", name, getattr(self, name))
        if self.d_inner % self.headdim:
            raise ValueError(f"Mamba2Config: d_inner = expand·d_model = {self.d_inner} must be a multiple of "
                             f"`headdim`={self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba2Config: `ngroups`={self.ngroups} must divide nheads = {self.nheads}")
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ValueError(f"Mamba2Config: need 0 < A_init_min <= A_init_max; got "
                             f"({self.A_init_min}, {self.A_init_max})")
        check_choice("Mamba2Config", "ssd_impl", self.ssd_impl, SSD_IMPLS + ("auto",))

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (MAMBA2,) * self.n_layer

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state
