"""Parity with HF transformers' MambaForCausalLM (torch, CPU, float32) through safetensors checkpoints.

Each config builds a transformers model with `torch.manual_seed`, perturbs every parameter away from its
initial value, saves it with `save_pretrained`, loads it with `load_hf` and compares logits and greedy
generations. The other tests cover `save_hf` → `from_pretrained`, the official (state-spaces) layout,
sharded checkpoints, bf16 files and bad inputs.
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
from mamba_jax.interop import load_hf, save_hf

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ATOL = 1e-4
PROMPT_LEN = 33
NEW_TOKENS = 32

# Odd widths, non-default dt_rank, d_state 4..32, conv kernel 2..4, 1-4 layers, every bias combination,
# tied and untied heads, vocab sizes that are not multiples of 8.
CONFIGS = {
    "d24_untied_bias_noconvbias": dict(vocab_size=61, hidden_size=24, state_size=8, num_hidden_layers=2,
                                       conv_kernel=3, time_step_rank=5, use_bias=True, use_conv_bias=False,
                                       tie_word_embeddings=False),
    "d40_tied_k2_n4_1layer": dict(vocab_size=77, hidden_size=40, state_size=4, num_hidden_layers=1,
                                  conv_kernel=2, time_step_rank=7, use_bias=False, use_conv_bias=True,
                                  tie_word_embeddings=True),
    "d56_tied_allbias_n32_expand3": dict(vocab_size=101, hidden_size=56, state_size=32, num_hidden_layers=3,
                                         conv_kernel=4, time_step_rank=3, expand=3, use_bias=True,
                                         use_conv_bias=True, tie_word_embeddings=True),
    "d40_untied_nobias_4layers_expand1": dict(vocab_size=53, hidden_size=40, state_size=16, num_hidden_layers=4,
                                              conv_kernel=4, time_step_rank=2, expand=1, use_bias=False,
                                              use_conv_bias=False, tie_word_embeddings=False,
                                              layer_norm_epsilon=1e-4),
}

# Perturbations: the mixer's Linear weights get noise of std gain/sqrt(fan_in) (strong enough that greedy
# decoding does not collapse onto one repeated token, as tied embeddings with a weak mixer do, yet the
# residual stream stays O(10) so float32 rounding is far below ATOL); D and the norms are redrawn.
_LINEAR_GAIN = {"in_proj.weight": 2.0, "out_proj.weight": 2.0, "x_proj.weight": 1.0}
_NOISE = {"A_log": 0.5, "dt_proj.bias": 0.5}


def _perturb_(model: torch.nn.Module) -> None:
    """Move every parameter away from its init (in place) so A_log, D, norms and biases are exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = next((g for key, g in _LINEAR_GAIN.items() if name.endswith(key)), None)
            if name.endswith("mixer.D"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif gain is not None:
                p.add_(gain / p.shape[1] ** 0.5 * torch.randn_like(p))
            else:
                scale = next((s for key, s in _NOISE.items() if name.endswith(key)), 0.1)
                p.add_(scale * torch.randn_like(p))


def _hf_model(kwargs, seed: int):
    torch.manual_seed(seed)
    config = transformers.MambaConfig(**kwargs, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                                      use_mambapy=False)
    model = transformers.MambaForCausalLM(config).eval()
    _perturb_(model)
    return model


def _token_ids(vocab: int, seed: int, batch: int = 2, length: int = PROMPT_LEN) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int64)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def _our_logits(model, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(name, hf torch model, its save_pretrained directory, our model, our params, token ids)."""
    name = request.param
    seed = sorted(CONFIGS).index(name)
    hf = _hf_model(CONFIGS[name], seed)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    model, params = load_hf(path)
    ids = _token_ids(CONFIGS[name]["vocab_size"], seed)
    return name, hf, path, model, params, ids


def test_perturbation_moves_every_parameter_off_init(case):
    name, hf, _, _, _, _ = case
    torch.manual_seed(sorted(CONFIGS).index(name))  # the same seed as the fixture, without the perturbation
    init = dict(transformers.MambaForCausalLM(hf.config).named_parameters())
    for key, p in hf.named_parameters():
        assert not torch.allclose(p, init[key], atol=1e-3), f"{key} still at its init value"


def test_config_maps_from_hf(case):
    name, hf, _, model, params, _ = case
    c, k = model.config, CONFIGS[name]
    assert (c.vocab_size, c.d_model, c.n_layer, c.d_state, c.d_conv) == (
        k["vocab_size"], k["hidden_size"], k["num_hidden_layers"], k["state_size"], k["conv_kernel"])
    assert (c.expand, c.dt_rank_value, c.bias, c.conv_bias, c.tie_embeddings) == (
        k.get("expand", 2), k["time_step_rank"], k["use_bias"], k["use_conv_bias"], k["tie_word_embeddings"])
    assert c.rms_norm_eps == k.get("layer_norm_epsilon", 1e-5)
    assert ("lm_head" in params) == (not k["tie_word_embeddings"])


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


def test_save_hf_loads_in_transformers(case, tmp_path):
    name, hf, _, model, params, ids = case
    save_hf(model, params, tmp_path)
    saved = stnp.load_file(str(tmp_path / "model.safetensors"))
    vocab = CONFIGS[name]["vocab_size"]
    assert saved["backbone.embeddings.weight"].shape == (vocab, CONFIGS[name]["hidden_size"])
    assert ("lm_head.weight" in saved) == (not CONFIGS[name]["tie_word_embeddings"])
    assert all(v.dtype == np.float32 for v in saved.values())
    for key, value in hf.state_dict().items():  # the exact tensors transformers had
        if key in saved:
            np.testing.assert_array_equal(saved[key], value.numpy(), err_msg=key)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["architectures"] == ["MambaForCausalLM"]

    reloaded = transformers.MambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, ids), _our_logits(model, params, ids), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


def _write_official(hf, path, *, tied_head_copy: bool) -> None:
    """Rewrite an HF checkpoint in the official state-spaces layout: `backbone.embedding.weight`, vocab rows
    padded to a multiple of 8 (random pad rows, as in real checkpoints) and the official config.json."""
    c = hf.config
    tensors = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    tensors.pop("lm_head.weight", None) if c.tie_word_embeddings else None
    padded = -(-c.vocab_size // 8) * 8
    rng = np.random.RandomState(7)
    pad = lambda t: np.concatenate([t, rng.randn(padded - t.shape[0], t.shape[1]).astype(t.dtype)])
    tensors["backbone.embedding.weight"] = pad(tensors.pop("backbone.embeddings.weight"))
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = pad(tensors["lm_head.weight"])
    elif tied_head_copy:
        tensors["lm_head.weight"] = tensors["backbone.embedding.weight"].copy()
    config = {
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": c.vocab_size,
        "ssm_cfg": {"layer": "Mamba1", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                    "dt_rank": c.time_step_rank, "conv_bias": c.use_conv_bias, "bias": c.use_bias},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": c.tie_word_embeddings,
    }
    if c.layer_norm_epsilon != 1e-5:  # official configs do not carry it (always 1e-5); load_hf reads this key
        config["norm_epsilon"] = c.layer_norm_epsilon
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    stnp.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def test_official_layout_loads_to_same_logits(case, tmp_path):
    name, hf, _, _, _, ids = case
    _write_official(hf, tmp_path, tied_head_copy=True)
    model, params = load_hf(tmp_path)
    assert model.config.tie_embeddings == CONFIGS[name]["tie_word_embeddings"]
    np.testing.assert_allclose(_our_logits(model, params, ids), _hf_logits(hf, ids), rtol=0, atol=ATOL)


def test_sharded_checkpoint_loads(case, tmp_path):
    _, hf, path, model, params, _ = case
    tensors = stnp.load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        stnp.save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, sharded = load_hf(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, params)


# --------------------------------------------------------------------------------------------------
# dtype and bad inputs (one small checkpoint)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    hf = _hf_model(CONFIGS["d24_untied_bias_noconvbias"], seed=11)
    path = tmp_path_factory.mktemp("small")
    hf.save_pretrained(path)
    return hf, path


def _copy_with(src, dst, edit) -> None:
    """Copy a checkpoint directory, passing its tensors (dict) through `edit` first."""
    tensors = dict(stnp.load_file(str(src / "model.safetensors")))
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    stnp.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_bfloat16_checkpoint_loads_in_param_dtype(small_dir, tmp_path):
    hf, _ = small_dir
    bf = transformers.MambaForCausalLM(hf.config)
    bf.load_state_dict(hf.state_dict())
    bf.to(torch.bfloat16).save_pretrained(tmp_path)
    model, params = load_hf(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    a_log = params["layers_1"]["mixer"]["A_log"]
    # A_log, D and the Δ bias load in float32 (as the model creates them), the rest in param_dtype
    assert a_log.dtype == jnp.float32 and model.config.jnp_dtype == jnp.bfloat16
    assert params["layers_1"]["mixer"]["D"].dtype == params["layers_1"]["mixer"]["dt_proj_bias"].dtype == jnp.float32
    assert params["layers_1"]["mixer"]["conv1d_kernel"].dtype == jnp.bfloat16
    expected = bf.backbone.layers[1].mixer.A_log.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(a_log, np.float32), expected)
    expected_conv = bf.backbone.layers[0].mixer.conv1d.weight.detach().float().numpy()[:, 0, :].T
    np.testing.assert_array_equal(np.asarray(params["layers_0"]["mixer"]["conv1d_kernel"], np.float32),
                                  expected_conv)


def test_missing_tensor_is_named(small_dir, tmp_path):
    _, src = small_dir
    _copy_with(src, tmp_path, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(ValueError, match=r"missing.*backbone\.layers\.1\.mixer\.D"):
        load_hf(tmp_path)


def test_missing_untied_head_is_named(small_dir, tmp_path):
    _, src = small_dir
    _copy_with(src, tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing.*lm_head\.weight"):
        load_hf(tmp_path)


def test_wrong_shape_is_named_with_both_shapes(small_dir, tmp_path):
    _, src = small_dir

    def edit(t):
        t["backbone.layers.0.mixer.A_log"] = np.ascontiguousarray(t["backbone.layers.0.mixer.A_log"].T)

    _copy_with(src, tmp_path, edit)
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.A_log.*\(8, 48\).*expected \(48, 8\)"):
        load_hf(tmp_path)


def test_wrong_embedding_shape_is_named(small_dir, tmp_path):
    _, src = small_dir

    def edit(t):
        t["backbone.embeddings.weight"] = t["backbone.embeddings.weight"][:-3].copy()

    _copy_with(src, tmp_path, edit)
    with pytest.raises(ValueError, match=r"backbone\.embeddings\.weight.*\(58, 24\)"):
        load_hf(tmp_path)


def test_unused_tensors_are_listed(small_dir, tmp_path):
    _, src = small_dir

    def edit(t):
        t["backbone.layers.2.mixer.D"] = np.ones(48, np.float32)
        t["extra.bias"] = np.ones(3, np.float32)

    _copy_with(src, tmp_path, edit)
    with pytest.raises(ValueError, match=r"does not use.*backbone\.layers\.2\.mixer\.D.*extra\.bias"):
        load_hf(tmp_path)


def test_tied_head_that_differs_is_rejected(small_dir, tmp_path):
    _, src = small_dir
    _copy_with(src, tmp_path, lambda t: None)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tied.*lm_head\.weight"):
        load_hf(tmp_path)


def test_pickle_only_directory_is_refused(small_dir, tmp_path):
    hf, src = small_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickle.*safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("key,value,pattern", [
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gpt2", "model_type"),
    ("intermediate_size", 50, "intermediate_size"),
])
def test_unsupported_hf_config_is_refused(small_dir, tmp_path, key, value, pattern):
    _, src = small_dir
    _copy_with(src, tmp_path, lambda t: None)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=pattern):
        load_hf(tmp_path)


def test_missing_directory_and_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_hf(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path)


def test_save_hf_rejects_params_of_another_shape(small_dir, tmp_path):
    _, src = small_dir
    model, params = load_hf(src)
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["layers_0"]["mixer"]["D"] = jnp.ones(7)
    with pytest.raises(ValueError, match=r"D.*\(7,\).*expected \(48,\)"):
        save_hf(model, params, tmp_path)


def test_save_hf_keeps_bfloat16_params(small_dir, tmp_path):
    hf, src = small_dir
    model, params = load_hf(src, param_dtype="bfloat16")
    save_hf(model, params, tmp_path)
    reloaded = transformers.MambaForCausalLM.from_pretrained(tmp_path, dtype="auto")
    state = reloaded.state_dict()
    assert state["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    for key, value in hf.state_dict().items():
        np.testing.assert_array_equal(state[key].float().numpy(), value.to(torch.bfloat16).float().numpy(),
                                      err_msg=key)
