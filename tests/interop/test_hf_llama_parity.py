"""Parity with HF transformers' LlamaForCausalLM (torch, CPU, float32).

Each config builds a transformers model with `torch.manual_seed`, perturbs every parameter away from its
initial value (norm weights included), then: copies the weights into ours with `hf_llama.tensor_specs`
(no files), loads the `save_pretrained` directory with `load_hf`, and compares logits and greedy
generations (also on a left-padded batch); `save_hf` → `LlamaForCausalLM.from_pretrained` closes the loop.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stnp
import torch
import transformers

from mamba_jax.inference import generate
from mamba_jax.interop import load_hf, params_from_torch_tensors, save_hf
from mamba_jax.interop import hf_llama
from mamba_jax.models import TransformerConfig, TransformerLM

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ATOL = 1e-4
PROMPT_LEN = 21
NEW_TOKENS = 32

# GQA (2 of 4), MQA (1 of 6), MHA; head_dim = hidden / heads and explicit ones (12, 16 with h·dh != hidden);
# every bias combination; tied and untied heads; several eps and rope bases; vocab not a multiple of 8.
CONFIGS = {
    "gqa_attnbias_untied": dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=False,
                                tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500.0),
    "mqa_hd12_mlpbias_tied_3layers": dict(vocab_size=77, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                          num_attention_heads=6, num_key_value_heads=1, head_dim=12,
                                          attention_bias=False, mlp_bias=True, tie_word_embeddings=True,
                                          rms_norm_eps=1e-6, rope_theta=10000.0),
    "mha_hd16_allbias_1layer": dict(vocab_size=53, hidden_size=24, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=3, num_key_value_heads=3, head_dim=16, attention_bias=True,
                                    mlp_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-4, rope_theta=1e6),
}


def _hf_config(kwargs) -> transformers.LlamaConfig:
    kwargs = dict(kwargs)
    theta = kwargs.pop("rope_theta")
    return transformers.LlamaConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                    eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _perturb_(model: torch.nn.Module) -> None:
    """Move every parameter off its init (in place): Linear weights get N(0, 1/fan_in) noise (attention far
    from uniform, varied greedy tokens, residual stream O(10)), norms 1 + N(0, 0.3²), the rest N(0, 0.1²)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.add_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))


def _hf_model(kwargs, seed: int):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(kwargs)).eval()
    _perturb_(model)
    return model


def _token_ids(vocab: int, seed: int, batch: int = 2, length: int = PROMPT_LEN) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int64)


def _hf_logits(model, ids: np.ndarray, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(ids), **kw).logits.float().numpy()


_apply = jax.jit(lambda model, params, ids: model.apply({"params": params}, ids), static_argnums=0)


def _our_logits(model, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(_apply(model, params, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(name, hf torch model, its save_pretrained directory, our model, our params (load_hf), token ids)."""
    name = request.param
    seed = sorted(CONFIGS).index(name)
    hf = _hf_model(CONFIGS[name], seed)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    model, params = load_hf(path)
    return name, hf, path, model, params, _token_ids(CONFIGS[name]["vocab_size"], seed)


def test_perturbation_moves_every_parameter_off_init(case):
    name, hf, _, _, _, _ = case
    torch.manual_seed(sorted(CONFIGS).index(name))  # the fixture's seed, without the perturbation
    init = dict(transformers.LlamaForCausalLM(hf.config).named_parameters())
    for key, p in hf.named_parameters():
        assert not torch.allclose(p, init[key], atol=1e-3), f"{key} still at its init value"


def test_config_maps_from_hf(case):
    name, hf, path, model, params, _ = case
    c, k = model.config, CONFIGS[name]
    assert isinstance(model, TransformerLM) and c.position_embedding == "rope"
    assert (c.vocab_size, c.d_model, c.n_layer, c.d_intermediate, c.n_heads, c.kv_heads) == (
        k["vocab_size"], k["hidden_size"], k["num_hidden_layers"], k["intermediate_size"],
        k["num_attention_heads"], k["num_key_value_heads"])
    assert c.head_dim_value == k.get("head_dim", k["hidden_size"] // k["num_attention_heads"])
    assert (c.attention_bias, c.mlp_bias, c.tie_embeddings) == (k["attention_bias"], k["mlp_bias"],
                                                                k["tie_word_embeddings"])
    assert (c.rms_norm_eps, c.rope_theta) == (k["rms_norm_eps"], k["rope_theta"])
    assert ("lm_head" in params) == (not k["tie_word_embeddings"])
    # the rope base is read from `rope_parameters` (transformers 5) in the file transformers wrote
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["rope_theta"] == k["rope_theta"]


def test_tensor_specs_cover_the_state_dict_exactly(case):
    """Every HF tensor but the embedding and the head has one spec with its torch shape; copying the state
    dict through the specs (no files) gives the params load_hf gave."""
    _, hf, _, model, params, _ = case
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    specs = hf_llama.tensor_specs(model.config)
    generic = {"model.embed_tokens.weight", "lm_head.weight"}
    assert {s.name for s in specs} == set(state) - generic
    assert len(specs) == len({s.name for s in specs})
    for s in specs:
        assert tuple(state[s.name].shape) == s.torch_shape, s.name
        np.testing.assert_array_equal(s.to_torch(s.to_ours(state[s.name])), state[s.name])
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    direct = params_from_torch_tensors(state, model.config, family=hf_llama.FAMILY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, direct, jax.tree_util.tree_map(np.asarray, params))


def test_logits_match_transformers(case):
    _, hf, _, model, params, ids = case
    ref = _hf_logits(hf, ids)
    ours = _our_logits(model, params, ids)
    assert ours.shape == ref.shape == (2, PROMPT_LEN, hf.config.vocab_size)
    assert np.abs(ref).max() > 0.5  # logits are not degenerate
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_greedy_generation_matches_transformers(case):
    _, hf, _, model, params, ids = case
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                          do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    ref = out[:, PROMPT_LEN:].numpy()
    ours = np.asarray(generate(model, params, jnp.asarray(ids, jnp.int32), NEW_TOKENS, temperature=0.0))
    assert ref.shape == ours.shape == (2, NEW_TOKENS)
    assert min(len(np.unique(row)) for row in ref) > 3  # varied sequences, not one repeated token
    np.testing.assert_array_equal(ours, ref)


def test_left_padded_generation_matches_transformers(case):
    """A left-padded batch (HF: attention_mask; ours: prompt_mask) gives HF's tokens, and each padded row's
    real-position logits equal the row alone in HF."""
    _, hf, _, model, params, ids = case
    mask = np.ones_like(ids)
    mask[1, :8] = 0
    padded = np.where(mask == 1, ids, 0)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(padded), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    ours = np.asarray(generate(model, params, jnp.asarray(padded, jnp.int32), NEW_TOKENS, temperature=0.0,
                               prompt_mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(ours, out[:, PROMPT_LEN:].numpy())
    alone = _hf_logits(hf, ids[1:, 8:])
    ours_logits = np.asarray(jax.jit(lambda p, x, m: model.apply({"params": p}, x, mask=m))(
        params, jnp.asarray(padded, jnp.int32), jnp.asarray(mask)))
    np.testing.assert_allclose(ours_logits[1:, 8:], alone, rtol=0, atol=ATOL)


def test_save_hf_loads_in_transformers(case, tmp_path):
    name, hf, _, model, params, ids = case
    save_hf(model, params, tmp_path)
    saved = stnp.load_file(str(tmp_path / "model.safetensors"))
    k = CONFIGS[name]
    assert saved["model.embed_tokens.weight"].shape == (k["vocab_size"], k["hidden_size"])
    assert ("lm_head.weight" in saved) == (not k["tie_word_embeddings"])
    state = hf.state_dict()
    assert set(saved) == set(state) - ({"lm_head.weight"} if k["tie_word_embeddings"] else set())
    for key, value in saved.items():  # the exact tensors transformers had
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_theta"] == k["rope_theta"]
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))
    model2, params2 = load_hf(tmp_path)
    assert model2.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


# --------------------------------------------------------------------------------------------------
# configs and bad inputs (no torch model needed)
# --------------------------------------------------------------------------------------------------

def _raw(**changes):
    raw = _hf_config(CONFIGS["gqa_attnbias_untied"]).to_dict()
    raw.update(changes)
    return raw


def test_legacy_rope_theta_and_defaults():
    raw = _raw(rope_theta=77.0)
    del raw["rope_parameters"]
    assert hf_llama.config_from_hf(raw)["rope_theta"] == 77.0
    minimal = dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2)
    kw = hf_llama.config_from_hf(minimal)
    assert kw["rope_theta"] == 10000.0 and kw["tie_embeddings"] is False and kw["rms_norm_eps"] == 1e-6
    assert TransformerConfig(**kw).kv_heads == 2


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), r"rope_parameters\.rope_type"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "rope_parameters.*partial_rotary_factor"),
    (dict(attention_bias="yes"), "attention_bias"),
    (dict(mlp_bias=1), "mlp_bias"),
    (dict(pretraining_tp=2), "pretraining_tp"),
    (dict(model_type="mistral"), "model_type"),
])
def test_unsupported_hf_config_is_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        hf_llama.config_from_hf(_raw(**changes))


def test_load_hf_refuses_rope_scaling_file(tmp_path):
    hf = _hf_model(CONFIGS["mha_hd16_allbias_1layer"], 0)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_type"):
        load_hf(tmp_path)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = dict(stnp.load_file(str(tmp_path / "model.safetensors")))
    tensors.pop("model.layers.0.self_attn.k_proj.bias")
    stnp.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_hf(tmp_path)


@pytest.mark.parametrize("changes,match", [
    (dict(position_embedding="learned"), "only rotary position embeddings"),
    (dict(position_embedding="none"), "only rotary position embeddings"),
    (dict(d_intermediate=0), "always have an MLP"),
    (dict(d_model=30, n_heads=4, head_dim=8), "divisible by `n_heads`"),
])
def test_config_to_hf_refuses_what_llama_cannot_hold(changes, match):
    cfg = TransformerConfig(vocab_size=50, d_model=32, n_layer=1, d_intermediate=48, n_heads=4).replace(**changes)
    with pytest.raises(ValueError, match=match):
        hf_llama.config_to_hf(cfg)


def test_config_round_trips_through_transformers():
    cfg = TransformerConfig(vocab_size=50, d_model=32, n_layer=3, d_intermediate=40, n_heads=4, n_kv_heads=2,
                            head_dim=6, rope_theta=321.0, attention_bias=True, mlp_bias=True, tie_embeddings=False,
                            rms_norm_eps=3e-6, max_position_embeddings=99, initializer_range=0.03)
    raw = hf_llama.config_to_hf(cfg)
    hf_cfg = transformers.LlamaConfig.from_dict(raw)
    assert (hf_cfg.head_dim, hf_cfg.num_key_value_heads, hf_cfg.rope_parameters["rope_theta"]) == (6, 2, 321.0)
    assert hf_cfg.eos_token_id is None and hf_cfg.tie_word_embeddings is False
    back = TransformerConfig(**hf_llama.config_from_hf(hf_cfg.to_dict()))
    assert back == cfg
