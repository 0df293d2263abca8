"""Fields every language-model config shares, and the helpers the family configs build on.

Each model family has one frozen dataclass: `MambaConfig` (Mamba-1), `Mamba2Config`, `TransformerConfig`
and `HybridConfig` (a layer pattern over the three). They all inherit `BaseLMConfig`, so the model shell
(`mamba_jax.models.lm.DecoderLM`) reads the same fields from any of them, and each answers
`layer_kinds` (the mixer of every layer) and `mixer_config(kind)` (the config that mixer is built from).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16", "float64")

# Mixer kinds, as written in layer patterns.
MAMBA, MAMBA2, ATTENTION, MOE = "M", "M2", "A", "E"
MAMBA_MOE = "P"  # Mamba and MoE side by side in one block (MoE-Mamba's parallel variant)
MIXER_KINDS = (MAMBA, MAMBA2, ATTENTION, MOE, MAMBA_MOE)

# The fields of BaseLMConfig: a HybridConfig hands these to the config of each of its mixers.
COMMON_FIELDS = ("vocab_size", "d_model", "n_layer", "rms_norm_eps", "residual_in_fp32", "tie_embeddings",
                 "pad_vocab_size_multiple", "initializer_range", "dtype", "param_dtype")


# SSM parameters kept in (at least) float32 whatever `param_dtype` is, as the official code keeps them: the
# decay exp(Δ·A) and softplus(Δ + bias) are precision-critical, and these leaves are tiny (d or d·n values).
FLOAT32_PARAM_NAMES = frozenset({"A_log", "D", "dt_proj_bias", "dt_bias"})


def ssm_param_dtype(param_dtype):
    """The dtype of the `FLOAT32_PARAM_NAMES` leaves: float32, or float64 for float64 models."""
    return jnp.promote_types(jnp.float32, param_dtype)


def cast_params(params, param_dtype):
    """Every leaf of a parameter tree in `param_dtype`, except the `FLOAT32_PARAM_NAMES` leaves (in
    `ssm_param_dtype`) — what a model built with that param_dtype creates. Leaves may be numpy or jax arrays."""
    import jax

    def cast(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        dtype = ssm_param_dtype(param_dtype) if name in FLOAT32_PARAM_NAMES else jnp.dtype(param_dtype)
        return jnp.asarray(leaf, dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive int; got {value!r}")


def check_dt_range(owner: str, dt_min, dt_max, dt_init_floor) -> None:
    """The Δ initialisation range: 0 < dt_min <= dt_max and dt_init_floor > 0 (else the inverse softplus
    of the init is NaN or the range is empty)."""
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{owner}: `{name}` must be a number > 0 (Δ is a positive time step); got {value!r}")
    if dt_min > dt_max:
        raise ValueError(f"{owner}: need `dt_min` <= `dt_max` (Δ is initialised in [dt_min, dt_max]); "
                         f"got dt_min={dt_min!r} > dt_max={dt_max!r}")


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be one of {tuple(choices)}; got {value!r}")


def check_step_caches(owner: str, step_caches: bool, cache, seq_idx) -> None:
    """`step_caches` (a recurrent layer's state after every position of the chunk, for rollback) continues
    a cache and does not cross packed sequences."""
    if step_caches and cache is None:
        raise ValueError(f"{owner}: `step_caches=True` returns the cache after every position, so it needs a "
                         "`cache` to continue from")
    if step_caches and seq_idx is not None:
        raise ValueError(f"{owner}: `step_caches=True` does not take packed sequences (`seq_idx`)")


@dataclasses.dataclass(frozen=True)
class BaseLMConfig:
    """Embedding, residual stream, norms, head and dtypes: the part of a config that is not the mixer.

    d_intermediate: width of the SwiGLU MLP after each mixer (0: no MLP, the Mamba default; None: the
       family's rule for d_model, `default_mlp_width` — Llama's for the Transformer). Read it as `mlp_width`.
    remat: wrap each block in `nn.remat` (recompute its activations in the backward pass instead of
    storing them); parameters, values and gradients are unchanged. Applies to full forwards (not to
    cached decoding). Measured with `mamba-jax aot`: Mamba 1.4b on v5e:16x16 (fsdp, 256 × 2048, bf16)
    needs 38.41G of temporaries per chip without it and 16.6G with it (the XLA:CPU compile of a small
    model shows almost no change: 186 → 179 MB).
    The embedding table has `padded_vocab_size` rows (vocab padded to a multiple of
    `pad_vocab_size_multiple`); logits are returned for the first `vocab_size` entries only.
    """

    family: ClassVar[str] = "base"
    # old field name -> new, read by `from_dict` (configs saved with an earlier version)
    RENAMED: ClassVar[Dict[str, str]] = {}

    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 2
    rms_norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 8
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    d_intermediate: int = 0
    mlp_bias: bool = False
    remat: bool = False

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("vocab_size", "d_model", "n_layer", "pad_vocab_size_multiple"):
            check_positive_int(owner, name, getattr(self, name))
        d_mlp = self.d_intermediate
        if d_mlp is not None and (isinstance(d_mlp, bool) or not isinstance(d_mlp, int) or d_mlp < 0):
            raise ValueError(f"{owner}: `d_intermediate` must be an int >= 0 (0: no MLP) or None (the family's "
                             f"width for d_model); got {d_mlp!r}")
        for name in ("dtype", "param_dtype"):
            check_choice(owner, name, getattr(self, name), DTYPES)

    def default_mlp_width(self) -> int:
        """The MLP width when `d_intermediate` is None (no MLP unless a family says otherwise)."""
        return 0

    @property
    def mlp_width(self) -> int:
        """The SwiGLU MLP's hidden width (0: no MLP)."""
        return self.default_mlp_width() if self.d_intermediate is None else self.d_intermediate

    # -- what the model shell asks every config --
    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        """The mixer kind ("M", "M2" or "A") of every layer (each family config defines it)."""
        raise TypeError("BaseLMConfig holds the shared fields only; build a model from MambaConfig, Mamba2Config, "
                        "TransformerConfig or HybridConfig")

    def mixer_config(self, kind: str) -> "BaseLMConfig":
        """The config the mixer (and MLP) of a `kind` layer is built from."""
        if kind not in set(self.layer_kinds):
            raise ValueError(f"{type(self).__name__}: has no {kind!r} layers")
        return self

    @property
    def learned_positions(self) -> Optional[int]:
        """The number of learned absolute position embeddings, or None when the model has none."""
        return None

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- serialisation (config.json of our own checkpoints) --
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict: {"family": ..., field: value, ...} (nested configs as dicts)."""
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]):
        """The inverse of `to_dict` (unknown keys raise, naming them)."""
        raw = dict(raw)
        for old, new in cls.RENAMED.items():   # configs saved before a field was renamed
            if old in raw and new not in raw:
                raw[new] = raw.pop(old)
        family = raw.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"{cls.__name__}.from_dict: `family` is {family!r}; expected {cls.family!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
