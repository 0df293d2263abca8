"""HF transformers Llama (`model_type: "llama"`, `LlamaForCausalLM`) <-> TransformerLM.

`FAMILY` is what `mamba_jax.interop.hf.load_hf/save_hf` dispatch to for Llama checkpoints.

config.json (transformers `LlamaConfig`) -> TransformerConfig:

    vocab_size, hidden_size → d_model, intermediate_size → d_intermediate, num_hidden_layers → n_layer,
    num_attention_heads → n_heads, num_key_value_heads → n_kv_heads, head_dim, max_position_embeddings,
    rms_norm_eps, tie_word_embeddings → tie_embeddings (Llama's default: false), attention_bias, mlp_bias,
    initializer_range, rope theta: `rope_parameters.rope_theta` (transformers ≥ 5) or the legacy top-level
    `rope_theta` (default 10000). pad_vocab_size_multiple is ours only (read when present, never written).
    Refused (ValueError naming the key): a rope type other than "default" (`rope_parameters.rope_type`,
    or a non-null legacy `rope_scaling`), hidden_act != "silu", pretraining_tp > 1, non-bool biases.

Tensor names (torch layout; our layout in brackets; h, kv heads of head_dim dh, d = hidden, f = intermediate):

    model.embed_tokens.weight                        (V, d)        [embeddings.embedding (Vp, d)]
    model.layers.{i}.input_layernorm.weight          (d,)          [layers_{i}.norm.weight]
    model.layers.{i}.self_attn.q_proj.weight         (h·dh, d)     [layers_{i}.mixer.q_proj.kernel (d, h, dh)]
    model.layers.{i}.self_attn.{k,v}_proj.weight     (kv·dh, d)    [layers_{i}.mixer.{k,v}_proj.kernel (d, kv, dh)]
    model.layers.{i}.self_attn.o_proj.weight         (d, h·dh)     [layers_{i}.mixer.o_proj.kernel (h, dh, d)]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias     if attention_bias [(h or kv, dh)]
    model.layers.{i}.self_attn.o_proj.bias           if attention_bias [(d,)]
    model.layers.{i}.post_attention_layernorm.weight (d,)          [layers_{i}.mlp_norm.weight]
    model.layers.{i}.mlp.{gate,up}_proj.weight       (f, d)        [layers_{i}.mlp.{gate,up}_proj.kernel (d, f)]
    model.layers.{i}.mlp.down_proj.weight            (d, f)        [layers_{i}.mlp.down_proj.kernel (f, d)]
    model.layers.{i}.mlp.{gate,up,down}_proj.bias    if mlp_bias
    model.norm.weight                                (d,)          [norm_f.weight]
    lm_head.weight                                   (V, d)        untied only [lm_head.kernel (d, Vp)]

Only rotary-position models can be written as Llama (learned / no positions have no Llama equivalent).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from mamba_jax.interop.hf_common import LM_HEAD, HFFamily, TensorSpec, keep, transpose
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.models.transformer import TransformerLM

__all__ = ["FAMILY", "config_from_hf", "config_to_hf", "tensor_specs"]

MODEL_TYPE = "llama"
EMBED_NAME = "model.embed_tokens.weight"
DEFAULT_ROPE_THETA = 10000.0


def _require(raw: Mapping[str, Any], key: str):
    if key not in raw:
        raise ValueError(f"load_hf: Llama config.json has no `{key}`")
    return raw[key]


def _flag(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"load_hf: config.json `{key}` must be true or false; got {value!r}")
    return value


def _rope_theta(raw: Mapping[str, Any]) -> float:
    """The rotary base from `rope_parameters` (transformers ≥ 5) or the legacy `rope_theta`/`rope_scaling`;
    only the default (unscaled) rope is supported."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else scaling
        if kind != "default":
            raise ValueError(f"load_hf: config.json `rope_scaling` = {scaling!r} is not supported (only the "
                             "default, unscaled rotary embedding)")
    theta = raw.get("rope_theta", DEFAULT_ROPE_THETA)
    if params is not None:
        if not isinstance(params, Mapping):
            raise ValueError(f"load_hf: config.json `rope_parameters` must be a dict; got {params!r}")
        kind = params.get("rope_type", "default")
        if kind != "default":
            raise ValueError(f"load_hf: config.json `rope_parameters.rope_type` = {kind!r} is not supported "
                             "(only 'default', the unscaled rotary embedding)")
        unknown = sorted(set(params) - {"rope_type", "rope_theta"})
        if unknown:
            raise ValueError(f"load_hf: config.json `rope_parameters` has keys this loader does not understand: "
                             f"{unknown}")
        theta = params.get("rope_theta", theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"load_hf: config.json rope theta (`rope_parameters.rope_theta`) must be a positive "
                         f"number; got {theta!r}")
    return float(theta)


def config_from_hf(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of TransformerConfig from an HF transformers `LlamaConfig` dict (config.json).

    Missing optional keys take transformers' defaults. Raises ValueError naming the key for settings
    TransformerLM cannot reproduce.
    """
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"load_hf: config.json `model_type` must be 'llama'; got {raw['model_type']!r}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"load_hf: config.json `hidden_act` must be 'silu' (Llama's SwiGLU); got {act!r}")
    tp = raw.get("pretraining_tp", 1)
    if tp not in (None, 1):
        raise ValueError(f"load_hf: config.json `pretraining_tp` = {tp!r} is not supported (only 1)")
    n_heads = int(_require(raw, "num_attention_heads"))
    n_kv = raw.get("num_key_value_heads")
    head_dim = raw.get("head_dim")
    d_model = int(_require(raw, "hidden_size"))
    d_intermediate = int(_require(raw, "intermediate_size"))
    if d_intermediate < 1:
        raise ValueError(f"load_hf: config.json `intermediate_size` must be positive; got {d_intermediate}")
    kwargs = dict(
        vocab_size=int(_require(raw, "vocab_size")),
        d_model=d_model,
        n_layer=int(_require(raw, "num_hidden_layers")),
        d_intermediate=d_intermediate,
        n_heads=n_heads,
        n_kv_heads=None if n_kv is None else int(n_kv),
        head_dim=None if head_dim is None else int(head_dim),
        position_embedding="rope",
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        attention_bias=_flag(raw, "attention_bias", False),
        mlp_bias=_flag(raw, "mlp_bias", False),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=_flag(raw, "tie_word_embeddings", False),
        initializer_range=float(raw.get("initializer_range", 0.02)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
    )
    return kwargs


def config_to_hf(config: TransformerConfig) -> Dict[str, Any]:
    """The config.json dict of transformers' `LlamaForCausalLM` for `config` (rope models only)."""
    if not isinstance(config, TransformerConfig):
        raise ValueError(f"save_hf: a Llama checkpoint needs a TransformerConfig; got {type(config).__name__}")
    if config.position_embedding != "rope":
        raise ValueError(f"save_hf: only rotary position embeddings can be saved as Llama; `position_embedding` is "
                         f"{config.position_embedding!r} (use mamba_jax.interop.save_pretrained)")
    if not config.mlp_width:
        raise ValueError("save_hf: Llama layers always have an MLP; `d_intermediate` is 0")
    if config.d_model % config.n_heads:
        raise ValueError(f"save_hf: transformers' LlamaConfig needs `d_model` ({config.d_model}) divisible by "
                         f"`n_heads` ({config.n_heads}), even with an explicit head_dim")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim_value,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "rope_theta": float(config.rope_theta),  # where transformers 4.x reads it
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        # our models know no special tokens; None keeps transformers from assuming Llama's 1 / 2
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": config.param_dtype,
    }


def _linear(specs, name: str, out_features: int, in_features: int, path: Tuple[str, ...], bias: bool) -> None:
    specs.append(TensorSpec(name + ".weight", (out_features, in_features), path + ("kernel",), transpose, transpose))
    if bias:
        specs.append(TensorSpec(name + ".bias", (out_features,), path + ("bias",), keep, keep))


def _per_head(specs, name: str, heads: int, dh: int, d: int, path: Tuple[str, ...], bias: bool, out: bool) -> None:
    """A q/k/v projection (torch (heads·dh, d) -> ours (d, heads, dh)) or, `out`, o_proj (torch (d, heads·dh) ->
    ours (heads, dh, d))."""
    if out:
        specs.append(TensorSpec(name + ".weight", (d, heads * dh), path + ("kernel",),
                                lambda w: w.T.reshape(heads, dh, d), lambda k: k.reshape(heads * dh, d).T))
        if bias:
            specs.append(TensorSpec(name + ".bias", (d,), path + ("bias",), keep, keep))
        return
    specs.append(TensorSpec(name + ".weight", (heads * dh, d), path + ("kernel",),
                            lambda w: w.T.reshape(d, heads, dh), lambda k: k.reshape(d, heads * dh).T))
    if bias:
        specs.append(TensorSpec(name + ".bias", (heads * dh,), path + ("bias",),
                                lambda b: b.reshape(heads, dh), lambda b: b.reshape(heads * dh)))


def tensor_specs(config: TransformerConfig) -> Tuple[TensorSpec, ...]:
    """Every tensor of the HF Llama layout except the embedding and the head (see the module docstring)."""
    d, f = config.d_model, config.mlp_width
    h, kv, dh = config.n_heads, config.kv_heads, config.head_dim_value
    ab, mb = config.attention_bias, config.mlp_bias
    specs = []
    for i in range(config.n_layer):
        t, o = f"model.layers.{i}.", (f"layers_{i}",)
        specs.append(TensorSpec(t + "input_layernorm.weight", (d,), o + ("norm", "weight"), keep, keep))
        for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            _per_head(specs, t + "self_attn." + proj, heads, dh, d, o + ("mixer", proj), ab, out=proj == "o_proj")
        specs.append(TensorSpec(t + "post_attention_layernorm.weight", (d,), o + ("mlp_norm", "weight"),
                                keep, keep))
        for proj, out_f, in_f in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
            _linear(specs, t + "mlp." + proj, out_f, in_f, o + ("mlp", proj), mb)
    specs.append(TensorSpec("model.norm.weight", (d,), ("norm_f", "weight"), keep, keep))
    return tuple(specs)


FAMILY = HFFamily(model_type=MODEL_TYPE, model_cls=TransformerLM, config_from_hf=config_from_hf,
                  config_to_hf=config_to_hf, tensor_specs=tensor_specs, embed_name=EMBED_NAME,
                  head_name=LM_HEAD, embed_aliases=())
