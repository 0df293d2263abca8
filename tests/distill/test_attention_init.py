"""Attention → Mamba-2 initialisation: which layers, where each teacher weight lands (checked with
numpy, independently of the code), the linear-attention identity behind the mapping, and the masks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.distill import layouts
from mamba_jax.distill.attention_init import (
    attention_to_mamba2,
    extend_student,
    mamba2_student_config,
    new_mixer_mask,
    replaced_layers,
)
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.models import TransformerLM, init_params
from mamba_jax.models.hybrid import HybridLM
from mamba_jax.ops import ssd

TEACHER = TransformerConfig(vocab_size=40, d_model=32, n_layer=4, n_heads=4, n_kv_heads=2, d_intermediate=48)


@pytest.fixture(scope="module")
def teacher_params():
    return init_params(TransformerLM(TEACHER), jax.random.PRNGKey(0))


def test_replaced_layers_spread_evenly_or_as_listed():
    assert replaced_layers(8, fraction=0.5) == (0, 2, 4, 6)
    assert replaced_layers(8, fraction=0.25) == (0, 4)
    assert replaced_layers(8, fraction=0.125) == (0,)
    assert replaced_layers(28, fraction=6 / 28) == (0, 4, 9, 14, 18, 23)
    assert replaced_layers(28, layers=[27, 3, 3]) == (3, 27)
    for bad in (dict(layers=[8]), dict(layers=[-1]), dict(fraction=0.0), dict(fraction=1.5), dict(),
                dict(layers=[1], fraction=0.5)):
        with pytest.raises(ValueError, match="replaced_layers"):
            replaced_layers(8, **bad)


def test_student_config_has_one_mamba2_head_per_attention_head():
    config = mamba2_student_config(TEACHER, (1, 3))
    assert config.layer_kinds == ("A", "M2", "A", "M2")
    m2 = config.mixer_config("M2")
    assert (m2.n_heads, m2.head_dim, m2.d_state, m2.n_groups, m2.d_inner) == (4, 8, 8, 4, 32)
    assert m2.d_intermediate == TEACHER.d_intermediate
    with pytest.raises(ValueError, match="multiple of d_model"):
        mamba2_student_config(TransformerConfig(vocab_size=40, d_model=32, n_layer=2, n_heads=3, head_dim=8),
                              (0,))


FRESH = dict(conv_init="fresh", ssm_init="fresh", gate_init="fresh")      # MambaInLlama: only x, B, C, out copied


def test_teacher_weights_land_in_x_B_C_and_out_proj(teacher_params):
    config, params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[0, 2], **FRESH)
    fresh = init_params(HybridLM(config), jax.random.PRNGKey(1))
    h, dh, d = 4, 8, 32
    di = h * dh
    for i in range(4):
        t, s = teacher_params[f"layers_{i}"], params[f"layers_{i}"]
        for part in ("norm", "mlp_norm", "mlp"):                          # copied as they are
            jax.tree_util.tree_map(np.testing.assert_array_equal, s[part], t[part])
        if i in (1, 3):
            jax.tree_util.tree_map(np.testing.assert_array_equal, s["mixer"], t["mixer"])
            continue
        att = layouts.attention(t["mixer"])
        # query head j reads kv head j // 2 (grouped-query attention), written out by hand
        v_rep = np.concatenate([att["v_proj"][:, (j // 2) * dh:(j // 2 + 1) * dh] for j in range(h)], axis=1)
        k_rep = np.concatenate([att["k_proj"][:, (j // 2) * dh:(j // 2 + 1) * dh] for j in range(h)], axis=1)
        w = layouts.mamba2_in_proj(s["mixer"])
        assert w.shape == (d, 2 * di + 2 * h * dh + h)
        np.testing.assert_array_equal(w[:, di:2 * di], v_rep)                       # x <- W_V
        np.testing.assert_array_equal(w[:, 2 * di:3 * di], k_rep)                   # B <- W_K
        np.testing.assert_array_equal(w[:, 3 * di:4 * di], att["q_proj"])           # C <- W_Q
        np.testing.assert_array_equal(s["mixer"]["out_proj"]["kernel"], att["o_proj"])
        fresh_w = layouts.mamba2_in_proj(fresh[f"layers_{i}"]["mixer"])
        np.testing.assert_array_equal(w[:, :di], fresh_w[:, :di])                    # z fresh
        np.testing.assert_array_equal(w[:, 4 * di:], fresh_w[:, 4 * di:])            # dt fresh
        for name in ("A_log", "D", "dt_bias", "conv1d_x_kernel", "conv1d_bc_kernel", "norm_weight"):
            np.testing.assert_array_equal(s["mixer"][name], fresh[f"layers_{i}"]["mixer"][name])
    for name in ("embeddings", "norm_f"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], teacher_params[name])
    logits = HybridLM(config).apply({"params": params}, jnp.arange(12, dtype=jnp.int32)[None] % 40)
    assert logits.shape == (1, 12, 40) and bool(jnp.all(jnp.isfinite(logits)))


def test_the_mapping_makes_the_scan_a_causal_linear_attention(teacher_params):
    """With A = 0 and Δ = 1 the student's scan over (x, B, C) = (V, K, Q) projections equals causal linear
    attention of the teacher's q, k, v — the identity the initialisation rests on (a swap of B and C, or
    of the head order, breaks it)."""
    _, params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[0])
    h, kv, dh, l = 4, 2, 8, 10
    di = h * dh
    inputs = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (1, l, 32)))
    w = layouts.mamba2_in_proj(params["layers_0"]["mixer"])
    x, B, C = (inputs @ w[:, di:2 * di], inputs @ w[:, 2 * di:3 * di], inputs @ w[:, 3 * di:4 * di])
    y = ssd(jnp.asarray(x.reshape(1, l, h, dh)), jnp.ones((1, l, h)), jnp.zeros((h,)),
            jnp.asarray(B.reshape(1, l, h, dh)), jnp.asarray(C.reshape(1, l, h, dh)), chunk_size=4)
    att = layouts.attention(teacher_params["layers_0"]["mixer"])
    q = (inputs @ att["q_proj"]).reshape(l, h, dh)
    k = (inputs @ att["k_proj"]).reshape(l, kv, dh)
    v = (inputs @ att["v_proj"]).reshape(l, kv, dh)
    expected = np.zeros((l, h, dh))
    for t in range(l):
        for j in range(h):
            for s in range(t + 1):
                expected[t, j] += (q[t, j] @ k[s, j // 2]) * v[s, j // 2]
    np.testing.assert_allclose(np.asarray(y)[0], expected, rtol=1e-4, atol=1e-4)


def test_identity_conv_and_new_mixer_mask(teacher_params):
    config, params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), fraction=0.5,
                                         conv_init="identity")
    assert config.layer_kinds == ("M2", "A", "M2", "A")
    conv = layouts.mamba2_conv(params["layers_0"]["mixer"])
    assert np.all(conv[-1] == 1) and np.all(conv[:-1] == 0)
    mask = new_mixer_mask(config, params)
    assert jax.tree_util.tree_all(mask["layers_0"]["mixer"]) and jax.tree_util.tree_all(mask["layers_2"]["mixer"])
    flat = [m for part in ("embeddings", "norm_f") for m in jax.tree_util.tree_leaves(mask[part])]
    flat += jax.tree_util.tree_leaves(mask["layers_1"]) + jax.tree_util.tree_leaves(mask["layers_0"]["mlp"])
    assert not any(flat)
    with pytest.raises(ValueError, match="conv_init"):
        attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), fraction=0.5, conv_init="zeros")


def _silu(v):
    return v / (1 + np.exp(-v))


def test_default_init_makes_the_mixer_a_normalised_linear_attention(teacher_params):
    """The defaults (identity conv, Δ = 1, A = -0.01, D = 0, open gate) make the whole student mixer, not
    just its scan, the teacher head's linear-attention twin: per head, RMSNorm(Σ_{s≤t} e^{-0.01 (t-s)}
    (silu(q_t)·silu(k_s)) silu(v_s)) through W_O — written out here in numpy from the teacher's weights."""
    config, params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[1])
    m = params["layers_1"]["mixer"]
    h, kv, dh, l, d = 4, 2, 8, 10, 32
    di = h * dh
    w, bias = layouts.mamba2_in_proj(m), layouts.mamba2_in_proj(m, "bias")
    assert config.mixer_config("M2").bias
    np.testing.assert_array_equal(w[:, :di], 0)                                    # z: no input, bias 4
    np.testing.assert_array_equal(bias, np.r_[np.full(di, 4.0), np.zeros(w.shape[1] - di)])
    np.testing.assert_array_equal(w[:, -h:], 0)                                    # Δ: no input ...
    np.testing.assert_allclose(np.log1p(np.exp(np.asarray(m["dt_bias"]))), 1.0, rtol=1e-6)  # ... softplus = 1
    np.testing.assert_allclose(np.exp(np.asarray(m["A_log"])), 0.01, rtol=1e-6)
    np.testing.assert_array_equal(m["D"], 0)
    np.testing.assert_array_equal(m["out_proj"]["bias"], 0)

    from mamba_jax.layers.mamba2 import Mamba2Mixer
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (1, l, d)))
    got = np.asarray(Mamba2Mixer(config.mixer_config("M2")).apply({"params": m}, jnp.asarray(u))[0])[0]
    att = layouts.attention(teacher_params["layers_1"]["mixer"])
    q = _silu(u[0] @ att["q_proj"]).reshape(l, h, dh)
    k = _silu(u[0] @ att["k_proj"]).reshape(l, kv, dh)
    v = _silu(u[0] @ att["v_proj"]).reshape(l, kv, dh)
    y = np.zeros((l, h, dh))
    for t in range(l):
        for j in range(h):
            for s in range(t + 1):
                y[t, j] += np.exp(-0.01 * (t - s)) * (q[t, j] @ k[s, j // 2]) * v[s, j // 2]
    gate = 4.0 / (1 + np.exp(-4.0))
    y = y * gate
    y = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + TEACHER.rms_norm_eps)
    expected = y.reshape(l, di) @ att["o_proj"]
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="ssm_init"):
        attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[1], ssm_init="zeros")
    with pytest.raises(ValueError, match="gate_init"):
        attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[1], gate_init="closed")


def test_extend_student_carries_trained_mixers_and_maps_the_new_layers(teacher_params):
    """25 % → 50 %: layer 0's (trained) mixer and every other carried part stay bit for bit; layer 2's new
    mixer holds the teacher's attention weights (checked in numpy) with the linear-attention settings."""
    config, params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), fraction=0.25)
    assert config.layer_kinds == ("M2", "A", "A", "A")
    # stand-in for stage-1 training: perturb the mixer and an MLP so that nothing equals a fresh init
    noise = lambda tree, k: jax.tree_util.tree_map(
        lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(k), a.shape, a.dtype), tree)
    params = dict(params, layers_0={**params["layers_0"], "mixer": noise(params["layers_0"]["mixer"], 7)},
                  layers_3={**params["layers_3"], "mlp": noise(params["layers_3"]["mlp"], 8)})
    before = jax.tree_util.tree_map(np.array, params)
    new_config, new = extend_student(TEACHER, teacher_params, config, params, jax.random.PRNGKey(2), fraction=0.5)
    assert new_config.layer_kinds == ("M2", "A", "M2", "A")
    for name in new:
        if name != "layers_2":
            jax.tree_util.tree_map(np.testing.assert_array_equal, new[name], before[name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)                # input untouched
    for part in ("norm", "mlp_norm", "mlp"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, new["layers_2"][part], before["layers_2"][part])
    h, dh, di = 4, 8, 32
    att = layouts.attention(teacher_params["layers_2"]["mixer"])
    rep = lambda w: np.concatenate([w[:, (j // 2) * dh:(j // 2 + 1) * dh] for j in range(h)], axis=1)
    m = new["layers_2"]["mixer"]
    w = layouts.mamba2_in_proj(m)
    np.testing.assert_array_equal(w[:, di:2 * di], rep(att["v_proj"]))
    np.testing.assert_array_equal(w[:, 2 * di:3 * di], rep(att["k_proj"]))
    np.testing.assert_array_equal(w[:, 3 * di:4 * di], att["q_proj"])
    np.testing.assert_array_equal(m["out_proj"]["kernel"], att["o_proj"])
    np.testing.assert_array_equal(w[:, :di], 0)
    np.testing.assert_array_equal(m["D"], 0)
    logits = HybridLM(new_config).apply({"params": new}, jnp.arange(12, dtype=jnp.int32)[None] % 40)
    assert logits.shape == (1, 12, 40) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="must contain"):
        extend_student(TEACHER, teacher_params, new_config, new, jax.random.PRNGKey(2), layers=[0, 1])
    with pytest.raises(ValueError, match="different Mamba-2 config"):
        extend_student(TEACHER, teacher_params, config, params, jax.random.PRNGKey(2), fraction=0.5, **FRESH)
