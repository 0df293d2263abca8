"""Shared machinery of the HF-format checkpoint families: safetensors files, config.json, the tensor name map
(`TensorSpec`, `HFFamily`) and the conversion between torch-named tensors and our parameter trees.

Only safetensors files are read or written (no pickle). A checkpoint directory holds `config.json` and
either `model.safetensors` or shards listed in `model.safetensors.index.json`. Each family module
(`hf_mamba`, `hf_mamba2`, `hf_llama`) builds on this one; `hf` dispatches between them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mamba_jax.layers.config import cast_params

CONFIG_NAME = "config.json"


WEIGHTS_NAME = "model.safetensors"


INDEX_NAME = "model.safetensors.index.json"


EMBED_HF = "backbone.embeddings.weight"


EMBED_OFFICIAL = "backbone.embedding.weight"


LM_HEAD = "lm_head.weight"


NATIVE_MODEL_TYPE = "mamba_jax"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# ssm_cfg keys of the official Mamba-1 block that do not change the forward computation.


def _require(raw: Mapping[str, Any], key: str, where: str):
    if key not in raw:
        raise ValueError(f"load_hf: {where} config.json has no `{key}`")
    return raw[key]


def official_ssm_cfg(raw: Mapping[str, Any], known_keys, model_name: str) -> Dict[str, Any]:
    """The `ssm_cfg` of an official state-spaces config.json, after refusing what `model_name` cannot
    reproduce: unknown ssm_cfg keys, attention layers (`attn_layer_idx`), MLPs (`d_intermediate`), LayerNorm."""
    ssm = dict(raw.get("ssm_cfg") or {})
    unknown = sorted(set(ssm) - set(known_keys))
    if unknown:
        raise ValueError(f"load_hf: config.json `ssm_cfg` has keys this loader does not understand: {unknown}")
    if raw.get("attn_layer_idx"):
        raise ValueError(f"load_hf: hybrid checkpoints (non-empty `attn_layer_idx`) are not supported by {model_name}")
    if raw.get("d_intermediate", 0):
        raise ValueError(f"load_hf: checkpoints with MLP blocks (`d_intermediate` > 0) are not supported by {model_name}")
    if not raw.get("rms_norm", True):
        raise ValueError(f"load_hf: config.json `rms_norm` is false (LayerNorm); {model_name} supports RMSNorm only")
    return ssm


class TensorSpec(NamedTuple):
    """One checkpoint tensor: its torch name and shape, where it goes in our tree, and how to convert.

    path: the parameter's path, e.g. ("layers_0", "mixer", "A_log"), or a tuple of paths when one torch tensor
      holds several of our parameters (a fused projection stored as pieces); to_ours: numpy function from the
      torch layout to ours (one array, or a tuple of arrays in the order of the paths); to_torch: the inverse
      (called with one array per path).
    """

    name: str
    torch_shape: Tuple[int, ...]
    path: Tuple
    to_ours: Callable[[np.ndarray], Any]
    to_torch: Callable[..., np.ndarray]

    @property
    def paths(self) -> Tuple[Tuple[str, ...], ...]:
        return self.path if self.path and isinstance(self.path[0], tuple) else (self.path,)


def keep(x):
    return x


def transpose(x):
    return np.ascontiguousarray(x.T)


def conv_to_ours(w):  # (di, 1, k) -> (k, di)
    return np.ascontiguousarray(w[:, 0, :].T)


def conv_to_torch(w):  # (k, di) -> (di, 1, k)
    return np.ascontiguousarray(w.T[:, None, :])


def _set_path(tree: Dict[str, Any], path: Tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping[str, Any], path: Tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _pad_rows(table: np.ndarray, rows: int) -> np.ndarray:
    """(V, d) -> (rows, d) with zero rows appended."""
    if table.shape[0] == rows:
        return table
    return np.concatenate([table, np.zeros((rows - table.shape[0],) + table.shape[1:], table.dtype)], axis=0)


def _vocab_table(tensors: Mapping[str, np.ndarray], name: str, config) -> np.ndarray:
    """Check a (V, d) embedding/head table, V ∈ {vocab_size, padded_vocab_size}, and pad it to (Vp, d)."""
    table = tensors[name]
    allowed = sorted({config.vocab_size, config.padded_vocab_size})
    if table.ndim != 2 or table.shape[1] != config.d_model or table.shape[0] not in allowed:
        raise ValueError(f"load_hf: tensor `{name}` has shape {tuple(table.shape)}; expected "
                         f"(V, {config.d_model}) with V in {allowed} (vocab_size or padded vocab)")
    return _pad_rows(np.asarray(table), config.padded_vocab_size)


class HFFamily(NamedTuple):
    """How one model family maps to an HF transformers checkpoint.

    model_type: config.json `model_type` read and written; model_cls: our model class (its
    `config_type` is the config class); config_from_hf: config.json dict -> keyword arguments of the
    config class (ValueError for unsupported settings); config_to_hf: our config -> config.json dict;
    tensor_specs: every tensor except the embedding and the head; embed_name / head_name: those two
    (written with `embed_name`; `embed_aliases` are also accepted when reading).
    """

    model_type: str
    model_cls: type
    config_from_hf: Callable[[Mapping[str, Any]], Dict[str, Any]]
    config_to_hf: Callable[[Any], Dict[str, Any]]
    tensor_specs: Callable[[Any], Tuple[TensorSpec, ...]]
    embed_name: str
    head_name: str = LM_HEAD
    embed_aliases: Tuple[str, ...] = ()


def params_from_torch_tensors(tensors: Mapping[str, np.ndarray], config, param_dtype: Any = np.float32, *,
                              family: HFFamily) -> Dict[str, Any]:
    """Our parameter tree from torch-named tensors of `family`, in `param_dtype` (A_log, D and the Δ bias in
    float32, as the model creates them: `cast_params`).

    Accepts the family's embedding name or an alias. Raises ValueError naming every missing tensor, a
    tensor with the wrong shape (got vs expected), or every unused tensor. With tied embeddings a present
    head must equal the embedding.
    """
    names = set(tensors)
    embed_names = [x for x in (family.embed_name,) + family.embed_aliases if x in names]
    if len(embed_names) > 1:
        raise ValueError(f"load_hf: the checkpoint has more than one embedding tensor {embed_names}; expected one")
    specs = family.tensor_specs(config)
    required = [s.name for s in specs] + (embed_names or [family.embed_name])
    if not config.tie_embeddings:
        required.append(family.head_name)
    missing = [x for x in required if x not in names]
    if missing:
        raise ValueError(f"load_hf: the checkpoint is missing tensor(s) {missing} (config: n_layer={config.n_layer}, "
                         f"tie_embeddings={config.tie_embeddings}, {type(config).__name__})")
    optional = [family.head_name] if config.tie_embeddings else []
    unused = sorted(names - set(required) - set(optional))
    if unused:
        raise ValueError(f"load_hf: the checkpoint has tensor(s) the model does not use: {unused}")

    cast = np.asarray
    params: Dict[str, Any] = {}
    for spec in specs:
        value = tensors[spec.name]
        if tuple(value.shape) != spec.torch_shape:
            raise ValueError(f"load_hf: tensor `{spec.name}` has shape {tuple(value.shape)}; "
                             f"expected {spec.torch_shape}")
        converted = spec.to_ours(np.asarray(value))
        for path, array in zip(spec.paths, converted if len(spec.paths) > 1 else (converted,)):
            _set_path(params, path, cast(array))
    embedding = _vocab_table(tensors, embed_names[0], config)
    _set_path(params, ("embeddings", "embedding"), cast(embedding))
    if config.tie_embeddings:
        if family.head_name in names:
            head = _vocab_table(tensors, family.head_name, config)
            if not np.array_equal(head, embedding):
                raise ValueError(f"load_hf: config says the embeddings are tied but `{family.head_name}` differs "
                                 f"from `{embed_names[0]}`; set tie_word_embeddings/tie_embeddings to false")
    else:
        _set_path(params, ("lm_head", "kernel"), cast(transpose(_vocab_table(tensors, family.head_name, config))))
    return jax.tree_util.tree_map(np.asarray, cast_params(params, param_dtype))


def params_to_torch_tensors(params: Mapping[str, Any], config, family: HFFamily) -> Dict[str, np.ndarray]:
    """HF-named numpy tensors (torch layout, vocab rows unpadded, dtype kept) from our parameter tree."""
    out = {}
    for spec in family.tensor_specs(config):
        # contiguous: safetensors writes an array's buffer as it lies in memory, whatever its strides
        out[spec.name] = np.ascontiguousarray(spec.to_torch(*(np.asarray(_get_path(params, path)) for path in spec.paths)))
    out[family.embed_name] = np.ascontiguousarray(np.asarray(params["embeddings"]["embedding"])[:config.vocab_size])
    if not config.tie_embeddings:
        out[family.head_name] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T[:config.vocab_size])
    return out


def check_param_tree(params, model, fn: str, example_inputs=None) -> None:
    """Raise ValueError unless `params` has exactly the structure and shapes that `model.init` gives
    (on `example_inputs`, default one row of two token ids)."""
    example_inputs = (jnp.zeros((1, 2), jnp.int32),) if example_inputs is None else tuple(example_inputs)
    expected = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *example_inputs)["params"]))
    flat_exp = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if set(flat_exp) != set(flat_got):
        raise ValueError(f"{fn}: parameter names differ from the model's: missing "
                         f"{sorted(set(flat_exp) - set(flat_got))}, unexpected {sorted(set(flat_got) - set(flat_exp))}")
    for key, shape in flat_exp.items():
        if tuple(flat_got[key]) != tuple(shape):
            raise ValueError(f"{fn}: parameter {key} has shape {tuple(flat_got[key])}; expected {tuple(shape)}")


def _safetensors_files(path: str) -> Tuple[str, ...]:
    """The safetensors file(s) of a checkpoint directory (the shards of an index, or model.safetensors)."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_hf: {index} has no `weight_map`")
        return tuple(os.path.join(path, shard) for shard in sorted(set(weight_map.values())))
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return (single,)
    pickled = sorted(x for x in os.listdir(path) if x.endswith(_PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"load_hf: {path} holds only pickle checkpoint(s) {pickled}; pickle files are not loaded (unpickling "
            "runs arbitrary code). Convert once to safetensors, e.g. with transformers: "
            "`MambaForCausalLM.from_pretrained(path).save_pretrained(out_dir, safe_serialization=True)`, or "
            "`safetensors.torch.save_file(torch.load(bin, weights_only=True), 'model.safetensors')`")
    raise ValueError(f"load_hf: {path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bf16 as ml_dtypes.bfloat16), name -> array."""
    tensors: Dict[str, np.ndarray] = {}
    for file in _safetensors_files(path):
        if not os.path.isfile(file):
            raise ValueError(f"load_hf: shard {file} listed in {INDEX_NAME} does not exist")
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"load_hf: tensor `{name}` appears in more than one shard")
                tensors[name] = f.get_tensor(name)
    return tensors


def read_config(path, fn: str = "load_hf") -> Dict[str, Any]:
    """The parsed config.json of a checkpoint directory (ValueError when there is none)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{fn}: `path` must be a checkpoint directory; {path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"{fn}: {path} has no {CONFIG_NAME}")
    with open(config_file) as f:
        return json.load(f)


def unbox_params(params):
    """Accept params, boxed params, or {"params": params}; return the plain tree."""
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def write_checkpoint(path, config_dict: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """config.json + model.safetensors (metadata format "pt", as transformers expects) in `path`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    save_file(dict(tensors), os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
