"""Parity with HF transformers' Mamba2ForCausalLM (torch, CPU, float32).

Each config builds a transformers model with `torch.manual_seed`, perturbs every parameter away from its
initial value, copies its state dict into ours through `hf_mamba2.FAMILY` (config_from_hf, tensor_specs)
and compares logits and 32 greedy tokens. Other tests: the name map against transformers' own state
dict, config.json both ways, the checkpoint round trips (`save_hf`/`load_hf` and `from_pretrained`),
the Δ limit, and refused configs.
"""
from __future__ import annotations

import math
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
from mamba_jax.interop.hf import params_from_torch_tensors, params_to_torch_tensors, write_checkpoint
from mamba_jax.interop.hf_mamba2 import FAMILY, config_from_hf, config_to_hf, tensor_specs
from mamba_jax.models import Mamba2Config, Mamba2LM

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ATOL = 1e-4
PROMPT_LEN = 33
NEW_TOKENS = 32

# d_state 4..16, head_dim 4..12, conv kernel 2..4, 1-3 layers, every bias combination, tied and untied
# heads, vocab sizes that are not multiples of 8, chunk sizes that do not divide the prompt, 1 and 2 groups.
CONFIGS = {
    "g1_d32_untied_bias_noconvbias": dict(vocab_size=61, hidden_size=32, state_size=8, num_hidden_layers=2,
                                          num_heads=8, head_dim=8, n_groups=1, conv_kernel=3, use_bias=True,
                                          use_conv_bias=False, tie_word_embeddings=False, chunk_size=8),
    "g1_d24_tied_k2_n4_1layer": dict(vocab_size=77, hidden_size=24, state_size=4, num_hidden_layers=1,
                                     num_heads=4, head_dim=12, n_groups=1, conv_kernel=2, use_bias=False,
                                     use_conv_bias=True, tie_word_embeddings=True, chunk_size=5),
    "g2_d40_tied_allbias_expand1_eps": dict(vocab_size=53, hidden_size=40, state_size=16, num_hidden_layers=3,
                                            expand=1, num_heads=10, head_dim=4, n_groups=2, conv_kernel=4,
                                            use_bias=True, use_conv_bias=True, tie_word_embeddings=True,
                                            chunk_size=7, layer_norm_epsilon=1e-4),
}

# Perturbations: the mixer's Linear weights get noise of std gain/sqrt(fan_in) (greedy decoding stays
# varied, the residual stream O(10)); D and the norms are redrawn; everything else gets small noise.
_LINEAR_GAIN = {"in_proj.weight": 2.0, "out_proj.weight": 2.0}
_NOISE = {"A_log": 0.5, "dt_bias": 0.5}


def _perturb_(model: torch.nn.Module) -> None:
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


def _hf_config(kwargs):
    return transformers.Mamba2Config(**kwargs, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _hf_model(kwargs, seed: int, perturb: bool = True):
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(_hf_config(kwargs)).eval()
    if perturb:
        _perturb_(model)
    return model


def _ours_from_hf(hf, **overrides):
    """(Mamba2LM, params) from a transformers model's config and state dict, through FAMILY."""
    config = Mamba2Config(**{**FAMILY.config_from_hf(hf.config.to_dict()), **overrides})
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = params_from_torch_tensors(tensors, config, family=FAMILY)
    return Mamba2LM(config), jax.tree_util.tree_map(jnp.asarray, params)


def _token_ids(vocab: int, seed: int, batch: int = 2, length: int = PROMPT_LEN) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int64)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def _our_logits(model, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """(name, hf torch model, our model, our params, token ids)."""
    name = request.param
    seed = sorted(CONFIGS).index(name)
    hf = _hf_model(CONFIGS[name], seed)
    model, params = _ours_from_hf(hf)
    return name, hf, model, params, _token_ids(CONFIGS[name]["vocab_size"], seed)


def test_perturbation_moves_every_parameter_off_init(case):
    name, hf, _, _, _ = case
    init = dict(_hf_model(CONFIGS[name], sorted(CONFIGS).index(name), perturb=False).named_parameters())
    for key, p in hf.named_parameters():
        assert not torch.allclose(p, init[key], atol=1e-3), f"{key} still at its init value"


def test_config_maps_from_hf(case):
    name, hf, model, params, _ = case
    c, k = model.config, CONFIGS[name]
    assert (c.vocab_size, c.d_model, c.n_layer, c.d_state, c.d_conv, c.expand) == (
        k["vocab_size"], k["hidden_size"], k["num_hidden_layers"], k["state_size"], k["conv_kernel"],
        k.get("expand", 2))
    assert (c.n_heads, c.head_dim, c.n_groups, c.chunk_size) == (k["num_heads"], k["head_dim"], k["n_groups"],
                                                              k["chunk_size"])
    assert (c.bias, c.conv_bias, c.tie_embeddings) == (k["use_bias"], k["use_conv_bias"], k["tie_word_embeddings"])
    assert c.rms_norm_eps == k.get("layer_norm_epsilon", 1e-5)
    assert (c.dt_limit_min, c.dt_limit_max, c.norm_before_gate) == (0.0, None, False)
    assert ("lm_head" in params) == (not k["tie_word_embeddings"])


def test_tensor_specs_name_every_hf_tensor(case):
    """The name map covers exactly transformers' state dict, less the embedding and head, with its shapes."""
    _, hf, model, _, _ = case
    state = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    specs = {s.name: s.torch_shape for s in tensor_specs(model.config)}
    assert set(specs) == set(state) - {"backbone.embeddings.weight", "lm_head.weight"}
    assert all(state[name] == shape for name, shape in specs.items())
    back = params_to_torch_tensors(jax.tree_util.tree_map(np.asarray, case[3]), model.config, FAMILY)
    for key, value in hf.state_dict().items():
        if key in back:
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_logits_match_transformers(case):
    _, hf, model, params, ids = case
    ref = _hf_logits(hf, ids)
    ours = _our_logits(model, params, ids)
    assert ours.shape == ref.shape == (2, PROMPT_LEN, hf.config.vocab_size)
    assert np.abs(ref).max() > 0.5  # logits are not degenerate
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_greedy_generation_matches_transformers(case):
    _, hf, model, params, ids = case
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                          do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    ref = out[:, PROMPT_LEN:].numpy()
    ours = np.asarray(generate(model, params, jnp.asarray(ids, jnp.int32), NEW_TOKENS, temperature=0.0))
    assert ref.shape == ours.shape == (2, NEW_TOKENS)
    assert min(len(np.unique(row)) for row in ref) > 3  # varied sequences, not one repeated token
    np.testing.assert_array_equal(ours, ref)


def test_dt_limit_matches_transformers_forward():
    """A finite `time_step_limit` clamps Δ in HF's chunked forward; ours clamps it the same way."""
    kwargs = dict(CONFIGS["g1_d24_tied_k2_n4_1layer"], time_step_limit=(0.02, 0.2))
    hf = _hf_model(kwargs, seed=5)
    model, params = _ours_from_hf(hf)
    assert (model.config.dt_limit_min, model.config.dt_limit_max) == (0.02, 0.2)
    ids = _token_ids(kwargs["vocab_size"], seed=5, length=12)
    ref = _hf_logits(hf, ids)
    np.testing.assert_allclose(_our_logits(model, params, ids), ref, rtol=0, atol=ATOL)
    unclamped, _ = _ours_from_hf(hf, dt_limit_min=0.0, dt_limit_max=None)
    assert np.abs(_our_logits(unclamped, params, ids) - ref).max() > 10 * ATOL  # the limit bites


# --------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------

def test_our_checkpoint_files_load_in_transformers(tmp_path):
    """params_to_torch_tensors + config_to_hf, written as files, load in transformers to the same logits."""
    hf = _hf_model(CONFIGS["g1_d32_untied_bias_noconvbias"], seed=7)
    model, params = _ours_from_hf(hf)
    tensors = params_to_torch_tensors(jax.tree_util.tree_map(np.asarray, params), model.config, FAMILY)
    write_checkpoint(tmp_path, FAMILY.config_to_hf(model.config), tensors)
    reloaded = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert "time_step_limit" not in (tmp_path / "config.json").read_text()  # default (0, inf): HF's default
    assert reloaded.config.time_step_limit[0] == 0.0 and math.isinf(reloaded.config.time_step_limit[1])
    ids = _token_ids(61, seed=7, length=10)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


@pytest.mark.parametrize("name", ["g1_d32_untied_bias_noconvbias", "g2_d40_tied_allbias_expand1_eps"])
def test_save_pretrained_load_hf_save_hf_from_pretrained(name, tmp_path):
    hf = _hf_model(CONFIGS[name], seed=8)
    hf.save_pretrained(tmp_path / "hf")
    model, params = load_hf(tmp_path / "hf")
    assert isinstance(model, Mamba2LM)
    ids = _token_ids(CONFIGS[name]["vocab_size"], seed=8, length=10)
    np.testing.assert_allclose(_our_logits(model, params, ids), _hf_logits(hf, ids), rtol=0, atol=ATOL)

    save_hf(model, params, tmp_path / "ours")
    saved = stnp.load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not CONFIGS[name]["tie_word_embeddings"])
    for key, value in hf.state_dict().items():  # the exact tensors transformers had
        if key in saved:
            np.testing.assert_array_equal(saved[key], value.numpy(), err_msg=key)
    reloaded = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert reloaded.config.architectures == ["Mamba2ForCausalLM"]
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


# --------------------------------------------------------------------------------------------------
# config.json both ways, refused settings
# --------------------------------------------------------------------------------------------------

_BASE = dict(model_type="mamba2", vocab_size=10, hidden_size=16, num_hidden_layers=1, num_heads=4, head_dim=8,
             n_groups=1)


def test_config_to_hf_round_trips_through_transformers():
    ours = Mamba2Config(vocab_size=70, d_model=48, n_layer=3, d_state=12, expand=3, head_dim=9, n_groups=4,
                        d_conv=3, bias=True, conv_bias=False, dt_limit_min=0.01, dt_limit_max=0.5,
                        chunk_size=64, rms_norm_eps=1e-6, gated_norm_eps=1e-6, tie_embeddings=False)
    raw = config_to_hf(ours)
    assert raw["model_type"] == "mamba2" and raw["architectures"] == ["Mamba2ForCausalLM"]
    hf = transformers.Mamba2Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    assert (hf.num_heads, hf.head_dim, hf.n_groups, hf.state_size, hf.expand) == (16, 9, 4, 12, 3)
    back = Mamba2Config(**config_from_hf(hf.to_dict()))
    assert back == ours.replace(initializer_range=back.initializer_range)


def test_infinite_limits_read_in_both_spellings():
    """transformers 5 writes inf as {"__float__": "Infinity"}; Python's json writes `Infinity`."""
    for upper in ({"__float__": "Infinity"}, math.inf):
        kwargs = config_from_hf({**_BASE, "time_step_limit": [0.01, upper]})
        assert (kwargs["dt_limit_min"], kwargs["dt_limit_max"]) == (0.01, None)
    raw = config_to_hf(Mamba2Config(d_model=16, head_dim=8, dt_limit_min=0.01))
    assert raw["time_step_limit"][0] == 0.01 and math.isinf(raw["time_step_limit"][1])


def test_config_to_hf_refuses_norm_before_gate():
    with pytest.raises(ValueError, match="norm_before_gate"):
        config_to_hf(Mamba2Config(norm_before_gate=True))


def test_gated_norm_eps_is_the_official_fixed_one_and_hf_sets_it():
    # the official block's RMSNormGated has a fixed eps 1e-5, whatever the model's norm epsilon
    assert Mamba2Config(rms_norm_eps=1e-6).gated_norm_eps == 1e-5
    assert config_from_hf({**_BASE, "layer_norm_epsilon": 1e-6})["gated_norm_eps"] == 1e-6   # HF: one eps
    with pytest.raises(ValueError, match="gated_norm_eps=1e-05"):
        config_to_hf(Mamba2Config(rms_norm_eps=1e-6))


@pytest.mark.parametrize("change,pattern", [
    (dict(num_heads=3), r"`num_heads`·`head_dim` = 3·8 must equal expand·hidden_size = 2·16"),
    (dict(n_groups=3), r"`n_groups`=3 must divide `num_heads`=4"),
    (dict(hidden_act="gelu"), "`hidden_act`"),
    (dict(norm_before_gate=True), "`norm_before_gate`"),
    (dict(time_step_limit=[0.5, 0.1]), "`time_step_limit`"),
    (dict(time_step_limit=[0.0, "big"]), "`time_step_limit`"),
    (dict(model_type="mamba"), "`model_type`"),
    (dict(hidden_size=None), "`hidden_size`"),
])
def test_unsupported_config_is_refused(change, pattern):
    raw = {**_BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=pattern):
        config_from_hf(raw)


def test_hf_defaults_fill_missing_keys():
    kwargs = config_from_hf(dict(vocab_size=10, hidden_size=4096, num_hidden_layers=2))
    defaults = transformers.Mamba2Config()
    assert (kwargs["d_state"], kwargs["head_dim"], kwargs["n_groups"], kwargs["chunk_size"]) == (
        defaults.state_size, defaults.head_dim, defaults.n_groups, defaults.chunk_size)
    assert kwargs["tie_embeddings"] == defaults.tie_word_embeddings
    assert kwargs["rms_norm_eps"] == defaults.layer_norm_epsilon


def test_official_layout_loads_to_same_logits(tmp_path):
    """An official state-spaces Mamba-2 checkpoint (d_model/n_layer/ssm_cfg config, `backbone.embedding`,
    vocab padded to a multiple of 8) of the same weights gives transformers' logits."""
    kwargs = CONFIGS["g1_d24_tied_k2_n4_1layer"]
    hf = _hf_model(kwargs, seed=11)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    embedding = tensors.pop("backbone.embeddings.weight")
    padded = -(-embedding.shape[0] // 8) * 8
    tensors["backbone.embedding.weight"] = np.concatenate(
        [embedding, np.zeros((padded - embedding.shape[0], embedding.shape[1]), embedding.dtype)])
    official = dict(d_model=24, d_intermediate=0, n_layer=1, vocab_size=kwargs["vocab_size"], rms_norm=True,
                    residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True,
                    attn_layer_idx=[], attn_cfg={},
                    ssm_cfg=dict(layer="Mamba2", d_state=4, d_conv=2, expand=2, headdim=12, ngroups=1,
                                 bias=False, conv_bias=True, chunk_size=5))
    write_checkpoint(tmp_path, official, tensors)
    model, params = load_hf(tmp_path)
    assert isinstance(model, Mamba2LM) and model.config.head_dim == 12
    ids = _token_ids(kwargs["vocab_size"], seed=11, length=12)
    np.testing.assert_allclose(_our_logits(model, params, ids), _hf_logits(hf, ids), atol=ATOL)
    official["ssm_cfg"]["D_has_hdim"] = True
    write_checkpoint(tmp_path, official, tensors)
    with pytest.raises(ValueError, match="D_has_hdim"):
        load_hf(tmp_path)
