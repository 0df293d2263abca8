"""HybridLM: Mamba-1, Mamba-2 and attention layers mixed by a layer pattern such as "MMAM MMAM".

A pattern is read left to right: "M2" is a Mamba-2 layer, "M" a Mamba-1 layer, "A" an attention layer,
"E" a Mixture-of-Experts feed-forward layer (`mamba_jax.layers.moe`; "M E M E" is MoE-Mamba);
whitespace only groups ("M2 M2 A M2" = 4 layers, "MMAM MMAM" = 8). Each layer takes its mixer (and MLP,
when that family's `d_intermediate` > 0) from the family sub-config; the vocabulary, width, depth,
norms and dtypes (`COMMON_FIELDS`) come from the hybrid config itself: a sub-config of a layer in the
pattern leaves them at their defaults or gives the hybrid's values (anything else is a ValueError, not a
silent override; a sub-config's n_layer is ignored, the pattern sets the depth).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.config import ATTENTION, COMMON_FIELDS, MAMBA, MAMBA2, MAMBA_MOE, MOE, BaseLMConfig
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.layers.moe import MoEBlockConfig
from mamba_jax.models.lm import DecoderLM

_SUB_CONFIGS = {MAMBA: ("mamba", MambaConfig), MAMBA2: ("mamba2", Mamba2Config),
                ATTENTION: ("attention", TransformerConfig), MOE: ("moe", MoEBlockConfig)}


def parse_pattern(pattern: str) -> Tuple[str, ...]:
    """The layer kinds of a pattern: "M2 MA" -> ("M2", "M", "A"). Raises ValueError naming a bad character."""
    if not isinstance(pattern, str):
        raise ValueError(f"HybridConfig: `pattern` must be a string such as 'MMAM MMAM'; got {pattern!r}")
    kinds, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch.isspace():
            i += 1
        elif pattern.startswith(MAMBA2, i):
            kinds.append(MAMBA2)
            i += 2
        elif ch in (MAMBA, ATTENTION, MOE, MAMBA_MOE):
            kinds.append(ch)
            i += 1
        else:
            raise ValueError(f"HybridConfig: `pattern` {pattern!r} has {ch!r} at position {i}; a pattern is made "
                             "of 'M' (Mamba-1), 'M2' (Mamba-2), 'A' (attention), 'E' (MoE feed-forward), 'P' (Mamba and "
                             "MoE in parallel) and spaces")
    if not kinds:
        raise ValueError(f"HybridConfig: `pattern` {pattern!r} has no layers")
    return tuple(kinds)


def _check_common_fields(hybrid, field: str, sub) -> None:
    """ValueError when the sub-config `field` sets a common field away from its default and from the
    hybrid's value (it would be silently replaced)."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(sub))}
    # n_layer is not read: the pattern sets the depth, and a whole model's config may serve as a sub-config
    for name in (n for n in COMMON_FIELDS if n != "n_layer"):
        mine, theirs = getattr(hybrid, name), getattr(sub, name)
        if theirs != mine and theirs != defaults[name]:
            raise ValueError(f"HybridConfig: `{field}.{name}`={theirs!r} differs from the hybrid's `{name}`={mine!r}; "
                             f"{name} is common to every layer and set on HybridConfig (leave it at its default in "
                             f"`{field}`, or set HybridConfig({name}=...))")


@dataclasses.dataclass(frozen=True)
class HybridConfig(BaseLMConfig):
    """A hybrid model: `pattern` chooses the mixer of every layer; `mamba`, `mamba2` and `attention` hold
    the hyper-parameters of each family (their common fields take this config's values; a used sub-config
    that sets one to something else is refused).

    n_layer is the number of layers in the pattern (leave it None, or give the same number).
    """

    family: ClassVar[str] = "hybrid"

    n_layer: Optional[int] = None
    pattern: str = "M A"
    mamba: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    mamba2: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)
    attention: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    moe: MoEBlockConfig = dataclasses.field(default_factory=MoEBlockConfig)

    def __post_init__(self):
        kinds = parse_pattern(self.pattern)
        if self.n_layer is None:
            object.__setattr__(self, "n_layer", len(kinds))
        elif self.n_layer != len(kinds):
            raise ValueError(f"HybridConfig: `n_layer`={self.n_layer} but `pattern` {self.pattern!r} has "
                             f"{len(kinds)} layers; leave n_layer unset")
        super().__post_init__()
        for kind in set(kinds) - {MAMBA_MOE} | ({MAMBA, MOE} if MAMBA_MOE in kinds else set()):
            field, cls = _SUB_CONFIGS[kind]
            if not isinstance(getattr(self, field), cls):
                raise ValueError(f"HybridConfig: `{field}` must be a {cls.__name__}; "
                                 f"got {type(getattr(self, field)).__name__}")
            _check_common_fields(self, field, getattr(self, field))
            self.mixer_config(kind)  # validates the sub-config at this width and depth
        if MAMBA_MOE in kinds:
            self.mixer_config(MAMBA_MOE)

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return parse_pattern(self.pattern)

    def mixer_config(self, kind: str) -> BaseLMConfig:
        if kind == MAMBA_MOE:  # both sublayers' configs; the block's MLP (if any) as a Mamba layer's
            from mamba_jax.layers.mamba_moe import ParallelMambaMoEConfig
            mamba = self.mixer_config(MAMBA)
            return ParallelMambaMoEConfig(mamba=mamba, moe=self.mixer_config(MOE), d_intermediate=mamba.d_intermediate,
                                          mlp_bias=mamba.mlp_bias,
                                          **{name: getattr(self, name) for name in COMMON_FIELDS})
        if kind not in _SUB_CONFIGS:
            raise ValueError(f"HybridConfig: unknown mixer kind {kind!r}")
        sub = getattr(self, _SUB_CONFIGS[kind][0])
        return sub.replace(**{name: getattr(self, name) for name in COMMON_FIELDS})

    @property
    def learned_positions(self) -> Optional[int]:
        return self.mixer_config(ATTENTION).learned_positions if ATTENTION in self.layer_kinds else None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "HybridConfig":
        raw: Dict[str, Any] = dict(raw)
        for field, sub_cls in _SUB_CONFIGS.values():
            if isinstance(raw.get(field), Mapping):
                raw[field] = sub_cls.from_dict(raw[field])
        return super().from_dict(raw)


class HybridLM(DecoderLM):
    """A hybrid language model: `DecoderLM` over a `HybridConfig` (see DecoderLM for the arguments)."""

    config: HybridConfig
    config_type = HybridConfig
