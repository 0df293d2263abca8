"""HybridLM and the shared decoder shell: layer patterns, one cache pytree, generate, save/load, embeds."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference import generate, prefill, step
from mamba_jax.interop import load_hf, load_pretrained, save_pretrained
from mamba_jax.models import (HybridConfig, HybridLM, Mamba2Config, Mamba2LM, MambaConfig, MambaLM, ModelCache,
                              TransformerConfig, TransformerLM, init_cache, init_params, param_axes, parse_pattern,
                              token_positions)

COMMON = dict(vocab_size=29, d_model=32)
SUBS = dict(
    mamba=MambaConfig(d_state=4),
    mamba2=Mamba2Config(d_state=8, head_dim=16, chunk_size=4),
    attention=TransformerConfig(n_heads=4, n_kv_heads=2, d_intermediate=48),
)


def hybrid(pattern, **kw):
    return HybridLM(HybridConfig(pattern=pattern, **COMMON, **SUBS, **kw))


def family_models():
    return {
        "mamba": MambaLM(MambaConfig(**COMMON, n_layer=2, d_state=4)),
        "mamba2": Mamba2LM(Mamba2Config(**COMMON, n_layer=2, d_state=8, head_dim=16, chunk_size=4)),
        "transformer": TransformerLM(TransformerConfig(**COMMON, n_layer=2, n_heads=4, d_intermediate=48)),
        "hybrid": hybrid("M M2 A"),
    }


@pytest.mark.parametrize("pattern,kinds", [
    ("MMAM MMAM", ("M", "M", "A", "M") * 2),
    ("M2 M2 A M2", ("M2", "M2", "A", "M2")),
    ("MM2A", ("M", "M2", "A")),
    ("  A ", ("A",)),
])
def test_parse_pattern(pattern, kinds):
    assert parse_pattern(pattern) == kinds
    assert HybridConfig(pattern=pattern, **COMMON, **SUBS).n_layer == len(kinds)


@pytest.mark.parametrize("pattern,match", [
    ("MXA", r"'X' at position 1"),
    ("M3", r"'3' at position 1"),
    ("   ", "has no layers"),
    (7, "must be a string"),
])
def test_bad_pattern_is_named(pattern, match):
    with pytest.raises(ValueError, match=match):
        HybridConfig(pattern=pattern)


def test_bad_hybrid_configs():
    with pytest.raises(ValueError, match=r"`n_layer`=3 but `pattern` 'MA' has 2 layers"):
        HybridConfig(pattern="MA", n_layer=3)
    with pytest.raises(ValueError, match=r"`attention` must be a TransformerConfig"):
        HybridConfig(pattern="MA", attention=MambaConfig())
    # the sub-config is validated at the hybrid's width: d_inner = 2·36 = 72 is not a multiple of head_dim 16
    with pytest.raises(ValueError, match="head_dim"):
        HybridConfig(pattern="M2", d_model=36, mamba2=Mamba2Config(head_dim=16))


def test_config_dict_round_trip_keeps_pattern_and_sub_configs():
    config = HybridConfig(pattern="M2 A M", **COMMON, **SUBS, tie_embeddings=False)
    raw = json.loads(json.dumps(config.to_dict()))
    assert raw["family"] == "hybrid" and raw["pattern"] == "M2 A M"
    assert HybridConfig.from_dict(raw) == config
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nope'\]"):
        HybridConfig.from_dict({**raw, "nope": 1})


def test_common_fields_come_from_the_hybrid_and_a_conflicting_sub_config_is_refused():
    config = HybridConfig(pattern="M2A", d_model=48, n_layer=None, rms_norm_eps=1e-6,
                          mamba2=Mamba2Config(head_dim=16), attention=TransformerConfig(n_heads=4, d_model=48))
    m2 = config.mixer_config("M2")
    assert (m2.d_model, m2.n_layer, m2.rms_norm_eps, m2.head_dim) == (48, 2, 1e-6, 16)
    assert config.mixer_config("A").d_model == 48
    with pytest.raises(ValueError, match=r"`mamba2.d_model`=15984 differs from the hybrid's `d_model`=48"):
        HybridConfig(pattern="M2A", d_model=48, mamba2=Mamba2Config(d_model=999 * 16, head_dim=16))
    with pytest.raises(ValueError, match=r"`attention.dtype`='bfloat16' differs"):
        HybridConfig(pattern="M2A", d_model=48, mamba2=Mamba2Config(head_dim=16),
                     attention=TransformerConfig(dtype="bfloat16"))
    # a sub-config of a family the pattern does not use is not read
    HybridConfig(pattern="M2", d_model=48, mamba2=Mamba2Config(head_dim=16), attention=TransformerConfig(d_model=8))


def test_each_layer_gets_its_mixer_and_mlp():
    model = hybrid("M M2 A")
    params = init_params(model, jax.random.PRNGKey(0))
    cfg = model.config
    assert params["layers_0"]["mixer"]["A_log"].shape == (2 * 32, 4)          # Mamba-1: (d_inner, d_state)
    assert params["layers_1"]["mixer"]["A_log"].shape == (64 // 16,)          # Mamba-2: one per head
    assert params["layers_2"]["mixer"]["q_proj"]["kernel"].shape == (32, 4, 8)      # (d_model, heads, head_dim)
    assert params["layers_2"]["mlp"]["gate_proj"]["kernel"].shape == (32, 48)  # attention family has an MLP
    assert "mlp" not in params["layers_0"] and "mlp" not in params["layers_1"]
    assert cfg.layer_kinds == ("M", "M2", "A")


def test_every_parameter_has_logical_axis_names():
    model = hybrid("M M2 A", tie_embeddings=False)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 20
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    axes = param_axes(model)
    assert tuple(axes["embeddings"]["embedding"]) == ("vocab", "embed")


def _ids(key, b, l, vocab=29):
    return jax.random.randint(jax.random.PRNGKey(key), (b, l), 0, vocab)


@pytest.mark.parametrize("pattern", ["MA", "A M2 M", "M2 A A M2"])
def test_hybrid_step_equals_forward(pattern):
    model = hybrid(pattern)
    params = init_params(model, jax.random.PRNGKey(1))
    ids = _ids(2, 2, 9)
    full = model.apply({"params": params}, ids)
    cache = init_cache(model.config, 2, max_len=9)
    logits, cache = prefill(model, params, ids[:, :4], cache)
    outs = [logits]
    for t in range(4, 9):
        last, cache = step(model, params, ids[:, t], cache)
        outs.append(last[:, None])
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
    assert isinstance(cache, ModelCache)
    np.testing.assert_array_equal(cache.positions, [9, 9])


def test_hybrid_left_padding_is_exact():
    model = hybrid("M2 A M")
    params = init_params(model, jax.random.PRNGKey(3))
    short, long = _ids(4, 1, 5), _ids(5, 1, 8)
    padded = jnp.concatenate([jnp.zeros((1, 3), short.dtype), short], axis=1)
    batch = jnp.concatenate([padded, long], axis=0)
    mask = jnp.concatenate([jnp.array([[0, 0, 0] + [1] * 5]), jnp.ones((1, 8), jnp.int32)], axis=0)
    forward = jax.jit(lambda p, x, m=None: model.apply({"params": p}, x, mask=m))
    logits, alone = forward(params, batch, mask), forward(params, short)
    np.testing.assert_allclose(logits[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
    tokens = generate(model, params, batch, 6, temperature=0.0, prompt_mask=mask)
    np.testing.assert_array_equal(tokens[0], generate(model, params, short, 6, temperature=0.0)[0])
    np.testing.assert_array_equal(tokens[1], generate(model, params, long, 6, temperature=0.0)[0])


def test_greedy_generation_is_argmax_of_forward():
    model = hybrid("A M2")
    params = init_params(model, jax.random.PRNGKey(6))
    ids = _ids(7, 2, 4)
    tokens = generate(model, params, ids, 5, temperature=0.0)
    # causal model: one forward over prompt + tokens ends each prefix at position 4 + t - 1
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.concatenate([ids, tokens], axis=1))
    np.testing.assert_array_equal(tokens, jnp.argmax(logits[:, 3:8], axis=-1))


def test_save_load_round_trip_keeps_pattern(tmp_path):
    model = hybrid("M2 A M", tie_embeddings=False)
    params = init_params(model, jax.random.PRNGKey(8))
    save_pretrained(model, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["pattern"] == "M2 A M"
    for loader in (load_pretrained, load_hf):
        loaded, loaded_params = loader(tmp_path)
        assert isinstance(loaded, HybridLM) and loaded.config == model.config
        ids = _ids(9, 2, 6)
        np.testing.assert_array_equal(loaded.apply({"params": loaded_params}, ids),
                                      model.apply({"params": params}, ids))


def test_load_rejects_params_of_another_pattern(tmp_path):
    model = hybrid("M A")
    save_pretrained(model, init_params(model, jax.random.PRNGKey(0)), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["config"]["pattern"] = "A M"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="load_pretrained: parameter names differ"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "transformer", "hybrid"])
def test_inputs_embeds_and_hidden_states(family):
    model = family_models()[family]
    params = init_params(model, jax.random.PRNGKey(10))
    ids = _ids(11, 2, 6)
    out = model.apply({"params": params}, ids, return_hidden_states=True, method="forward")
    embeds = params["embeddings"]["embedding"][ids]
    from_embeds = model.apply({"params": params}, inputs_embeds=embeds, return_hidden_states=True, method="forward")
    np.testing.assert_allclose(from_embeds.logits, out.logits, atol=1e-6)
    n = model.config.n_layer
    assert len(out.hidden_states) == n + 1
    assert all(h.shape == (2, 6, 32) for h in out.hidden_states)
    np.testing.assert_allclose(out.hidden_states[0], embeds, atol=1e-6)
    # the last hidden state, normalised and projected by the tied head, gives the logits
    h = out.hidden_states[-1]
    normed = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + model.config.rms_norm_eps)
    normed = normed * params["norm_f"]["weight"]
    np.testing.assert_allclose(normed @ params["embeddings"]["embedding"][:29].T, out.logits, atol=1e-4)


def test_bad_model_inputs_are_named():
    model = hybrid("MA")
    params = init_params(model, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="exactly one of `input_ids`"):
        model.apply({"params": params})
    with pytest.raises(ValueError, match=r"`inputs_embeds` must have shape \(b, l, 32\)"):
        model.apply({"params": params}, inputs_embeds=jnp.zeros((1, 4, 31)))
    with pytest.raises(ValueError, match="`max_len`"):
        init_cache(model.config, 2)
    with pytest.raises(ValueError, match="must be a HybridConfig"):
        HybridLM(MambaConfig())


def test_token_positions_count_real_tokens_and_restart_per_segment():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(token_positions(mask, None, None, 2, 5), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    seq_idx = jnp.array([[0, 0, 1, 1, 1], [3, 3, 3, 5, 5]])
    start = jnp.array([4, 7])
    np.testing.assert_array_equal(token_positions(None, seq_idx, start, 2, 5), [[4, 5, 0, 1, 2], [7, 8, 9, 0, 1]])
    # ids may repeat: only changes matter, as in the scans ([0, 0, 1, 1, 0, 0] is three sequences)
    np.testing.assert_array_equal(token_positions(None, jnp.array([[0, 0, 1, 1, 0, 0]]), jnp.array([5]), 1, 6),
                                  [[5, 6, 0, 1, 0, 1]])


def test_cache_positions_continue_after_a_packed_chunk():
    """After a packed prefill the next token continues the last sequence: decoding equals the forward of
    that sequence alone (rotary positions would differ otherwise)."""
    model = TransformerLM(TransformerConfig(**COMMON, n_layer=1, n_heads=4, d_intermediate=48))
    params = init_params(model, jax.random.PRNGKey(12))
    first, last = _ids(13, 1, 5), _ids(14, 1, 4)
    packed = jnp.concatenate([first, last], axis=1)
    seq_idx = jnp.array([[0] * 5 + [1] * 4])
    cache = init_cache(model.config, 1, max_len=12)
    cache = model.apply({"params": params}, packed, seq_idx=seq_idx, cache=cache, method="forward").cache
    np.testing.assert_array_equal(cache.positions, [4])
    nxt = _ids(15, 1, 1)
    decoded, _ = step(model, params, nxt[:, 0], cache)
    alone = model.apply({"params": params}, jnp.concatenate([last, nxt], axis=1))
    np.testing.assert_allclose(decoded, alone[:, -1], atol=1e-5)
