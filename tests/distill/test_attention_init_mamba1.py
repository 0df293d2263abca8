"""Attention → Mamba-1 initialisation (MambaInLlama's Mamba-1 form): the `bc_source="input"` mixer against a
float64 numpy recurrence written here, where each teacher weight lands, the linear-attention identity of
the mapping (and that MambaInLlama's literal copy breaks it under grouped-query attention), gradients, the
KD step and progressive replacement."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.distill import layouts
from mamba_jax.data import MQARTask, get_batch, make_dataset
from mamba_jax.distill import (
    KDConfig,
    attention_to_mamba1,
    extend_student,
    freeze_except,
    make_kd_train_step,
    mamba1_student_config,
    new_mixer_mask,
)
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.layers.mamba import MambaConfig, MambaMixer, init_layer_cache
from mamba_jax.models import TransformerLM, init_params
from mamba_jax.models.hybrid import HybridConfig, HybridLM
from mamba_jax.ops import selective_scan

# 4 query heads over 2 kv heads, head_dim 16: d_inner = 64 = 2 · d_model, d_xb = 32
TEACHER = TransformerConfig(vocab_size=40, d_model=32, n_layer=4, n_heads=4, n_kv_heads=2, head_dim=16,
                            d_intermediate=48)
H, KV, DH, D = 4, 2, 16, 32
FRESH = dict(conv_init="fresh", ssm_init="fresh", gate_init="fresh")      # MambaInLlama: only x, B, C, out copied


@pytest.fixture(scope="module")
def teacher_params():
    return init_params(TransformerLM(TEACHER), jax.random.PRNGKey(0))


def _silu(v):
    return v / (1 + np.exp(-v))


def _softplus(v):
    return np.log1p(np.exp(v))


def _chunks_repeated(w, size, rep):
    """(..., k·size) -> (..., k·rep·size), chunk i repeated rep times in place — written with a loop."""
    k = w.shape[-1] // size
    return np.concatenate([w[..., i * size:(i + 1) * size] for i in range(k) for _ in range(rep)], axis=-1)


def _mixer_init(cfg, seed):
    return nn.meta.unbox(MambaMixer(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, cfg.d_model)))["params"])


# --- the mixer option ---------------------------------------------------------------------------------

def test_default_mamba1_config_and_params_are_unchanged_and_bad_options_raise():
    cfg = MambaConfig(d_model=16, n_layer=1)
    assert (cfg.bc_source, cfg.d_xb, cfg.n_groups) == ("conv", None, 1)
    params = _mixer_init(cfg, 0)
    assert jax.tree_util.tree_map(np.shape, params) == {
        "in_proj": {"kernel": (2, 16, 32)}, "conv1d_kernel": (4, 32), "conv1d_bias": (32,),
        "x_proj": {"kernel": (32, 1 + 32)}, "dt_proj_kernel": (1, 32), "dt_proj_bias": (32,),
        "A_log": (32, 16), "D": (32,), "out_proj": {"kernel": (32, 16)}}
    for bad, match in ((dict(d_xb=8), "d_xb"), (dict(bc_source="output"), "bc_source"),
                       (dict(bc_source="input", d_state=5), "d_state"),
                       (dict(bc_source="input", d_state=4, d_xb=12), "d_xb"),
                       (dict(bc_source="input", d_xb=0), "d_xb")):
        with pytest.raises(ValueError, match=match):
            MambaConfig(d_model=16, n_layer=1, **bad)


INPUT_CFG = MambaConfig(d_model=16, n_layer=1, expand=2, d_state=4, d_xb=8, bc_source="input", bias=True,
                        dt_rank=3)


def _random_mixer_params(cfg, seed):
    """The mixer's own init, every leaf then perturbed so that no term (bias, D, A) is trivial."""
    params = _mixer_init(cfg, seed)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _numpy_mixer(p, u, cfg):
    """The bc_source="input" mixer, float64, one token and one channel at a time."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    di, dxb, n, r, k = cfg.d_inner, cfg.d_xb, cfg.d_state, cfg.dt_rank_value, cfg.d_conv
    l = u.shape[0]
    proj = u @ layouts.mamba1_in_proj(p) + layouts.mamba1_in_proj(p, "bias")
    z, x, B, C, dt_low = np.split(proj, [di, di + dxb, di + 2 * dxb, 2 * di + 2 * dxb], axis=-1)
    assert dt_low.shape[-1] == r
    x, B = _chunks_repeated(x, n, di // dxb), _chunks_repeated(B, n, di // dxb)
    xc = np.zeros((l, di))
    for t in range(l):
        for j in range(k):                         # tap k-1 multiplies the current token
            if t - (k - 1 - j) >= 0:
                xc[t] += p["conv1d_kernel"][j] * x[t - (k - 1 - j)]
    xc = _silu(xc + p["conv1d_bias"])
    delta = _softplus(dt_low @ p["dt_proj_kernel"] + p["dt_proj_bias"])
    A = -np.exp(p["A_log"])
    y = np.zeros((l, di))
    for c in range(di):
        g = c // n
        h = np.zeros(n)
        for t in range(l):
            h = np.exp(delta[t, c] * A[c]) * h + delta[t, c] * B[t, g * n:(g + 1) * n] * xc[t, c]
            y[t, c] = C[t, g * n:(g + 1) * n] @ h + p["D"][c] * xc[t, c]
    y = y * _silu(z)
    return y @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


def test_input_form_mixer_matches_a_float64_recurrence_and_its_step():
    cfg = INPUT_CFG
    assert (cfg.d_inner, cfg.n_groups, cfg.d_xb_value) == (32, 8, 8)
    params = _random_mixer_params(cfg, 3)
    assert params["in_proj_zc"]["kernel"].shape == (2, 16, 32) and params["in_proj_xb"]["kernel"].shape == (2, 16, 8)
    assert params["in_proj_dt"]["kernel"].shape == (16, 3) and "x_proj" not in params
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (2, 9, 16)))
    for impl in ("reference", "chunked"):
        got, _ = MambaMixer(cfg.replace(scan_impl=impl, chunk_size=4)).apply({"params": params}, jnp.asarray(u))
        for b in range(2):
            np.testing.assert_allclose(np.asarray(got[b]), _numpy_mixer(params, u[b], cfg), rtol=1e-4, atol=1e-5)
    # decoding one token at a time through the cache gives the same outputs
    full, _ = MambaMixer(cfg).apply({"params": params}, jnp.asarray(u))
    cache, steps = init_layer_cache(cfg, 2), []
    for t in range(9):
        y, cache = MambaMixer(cfg).apply({"params": params}, jnp.asarray(u[:, t:t + 1]), cache=cache)
        steps.append(y)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


# --- the initialisation ------------------------------------------------------------------------------

def test_student_config_is_the_mambainllama_mamba1_form():
    config = mamba1_student_config(TEACHER, (1, 3))
    assert config.layer_kinds == ("A", "M", "A", "M")
    m = config.mixer_config("M")
    assert (m.bc_source, m.expand, m.d_state, m.d_inner, m.d_xb, m.n_groups) == ("input", 2, 16, 64, 32, 4)
    assert m.d_intermediate == TEACHER.d_intermediate
    assert HybridConfig.from_dict(config.to_dict()) == config                     # checkpoint config round trip
    with pytest.raises(ValueError, match="d_state"):
        mamba1_student_config(TEACHER, (0,), d_state=6)
    with pytest.raises(ValueError, match="multiple of d_model"):
        mamba1_student_config(TransformerConfig(vocab_size=40, d_model=32, n_layer=2, n_heads=3, head_dim=16), (0,))


def _expected_q_columns(n):
    """Student C group g ← which W_Q columns, by walking the groups in the order the mixer repeats K/V:
    kv chunk c = (kv head j, chunk r) is read by groups c·rep .. c·rep + rep - 1, one per query head of j."""
    rep, s = H // KV, DH // n
    cols = []
    for j in range(KV):
        for r in range(s):
            for m in range(rep):
                head = j * rep + m
                cols.extend(range(head * DH + r * n, head * DH + (r + 1) * n))
    return np.array(cols)


@pytest.mark.parametrize("d_state", [8, 16])
def test_teacher_weights_land_in_x_B_C_and_out_proj(teacher_params, d_state):
    config, params = attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[0, 2],
                                         d_state=d_state, **FRESH)
    fresh = init_params(HybridLM(config), jax.random.PRNGKey(1))
    di, dxb = H * DH, KV * DH
    cols = _expected_q_columns(d_state)
    for i in range(4):
        t, s = teacher_params[f"layers_{i}"], params[f"layers_{i}"]
        for part in ("norm", "mlp_norm", "mlp"):
            jax.tree_util.tree_map(np.testing.assert_array_equal, s[part], t[part])
        if i in (1, 3):
            jax.tree_util.tree_map(np.testing.assert_array_equal, s["mixer"], t["mixer"])
            continue
        att = layouts.attention(t["mixer"])
        w = layouts.mamba1_in_proj(s["mixer"])
        r = w.shape[1] - 2 * di - 2 * dxb
        assert r == 2                                                                  # dt_rank = ceil(32 / 16)
        np.testing.assert_array_equal(w[:, di:di + dxb], att["v_proj"])                # x <- W_V (not repeated)
        np.testing.assert_array_equal(w[:, di + dxb:di + 2 * dxb], att["k_proj"])      # B <- W_K
        np.testing.assert_array_equal(w[:, di + 2 * dxb:2 * di + 2 * dxb], att["q_proj"][:, cols])  # C <- W_Q
        np.testing.assert_array_equal(s["mixer"]["out_proj"]["kernel"], att["o_proj"][cols])
        fresh_m = fresh[f"layers_{i}"]["mixer"]
        fresh_w = layouts.mamba1_in_proj(fresh_m)
        np.testing.assert_array_equal(w[:, :di], fresh_w[:, :di])                      # z fresh
        np.testing.assert_array_equal(w[:, -r:], fresh_w[:, -r:])                      # dt fresh
        for name in ("A_log", "D", "dt_proj_bias", "dt_proj_kernel", "conv1d_kernel", "conv1d_bias"):
            np.testing.assert_array_equal(s["mixer"][name], fresh_m[name])
    for name in ("embeddings", "norm_f"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], teacher_params[name])
    if d_state != 16:
        return
    # multi-head attention: the order is the identity, i.e. exactly MambaInLlama's copy
    mha = TEACHER.replace(n_kv_heads=None)
    mha_params = init_params(TransformerLM(mha), jax.random.PRNGKey(5))
    _, p = attention_to_mamba1(mha, mha_params, jax.random.PRNGKey(1), layers=[0], d_state=d_state, **FRESH)
    w, att = layouts.mamba1_in_proj(p["layers_0"]["mixer"]), layouts.attention(mha_params["layers_0"]["mixer"])
    np.testing.assert_array_equal(w[:, 2 * di + di:2 * di + 2 * di], att["q_proj"])   # d_xb = d_inner
    np.testing.assert_array_equal(p["layers_0"]["mixer"]["out_proj"]["kernel"], att["o_proj"])


def _sub_head_linear_attention(u, att, n, decay=0.0, value_feature=lambda v: v):
    """Causal linear attention of the teacher's q, k, v with heads split into chunks of n: for head i,
    chunk r, y = Σ_{s≤t} e^{-decay (t-s)} (q_t[i,r]·k_s[i//rep,r]) φ(v_s[i//rep,r]); then through W_O."""
    l, rep = u.shape[0], H // KV
    q = (u @ att["q_proj"]).reshape(l, H, DH // n, n)
    k = (u @ att["k_proj"]).reshape(l, KV, DH // n, n)
    v = value_feature(u @ att["v_proj"]).reshape(l, KV, DH // n, n)
    y = np.zeros((l, H, DH // n, n))
    for t in range(l):
        for i in range(H):
            for r in range(DH // n):
                for s in range(t + 1):
                    y[t, i, r] += np.exp(-decay * (t - s)) * (q[t, i, r] @ k[s, i // rep, r]) * v[s, i // rep, r]
    return y.reshape(l, H * DH) @ att["o_proj"]


@pytest.mark.parametrize("d_state", [8, 16])
def test_the_mapping_makes_the_scan_a_causal_linear_attention(teacher_params, d_state):
    """With A = 0 and Δ = 1 the grouped scan over (x, B, C) = (V, K, Q) projections, through out_proj,
    equals causal linear attention of the teacher's q, k, v in heads of width d_state (the whole head for
    d_state = head_dim). MambaInLlama's literal copy of W_Q / W_O pairs the wrong chunks under GQA when
    d_state < head_dim — shown here too."""
    config, params = attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[0],
                                         d_state=d_state)
    n, l, di, dxb = d_state, 7, H * DH, KV * DH
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (l, D)))
    att = layouts.attention(teacher_params["layers_0"]["mixer"])
    expected = _sub_head_linear_attention(u, att, n)

    def scan(w_q, w_o):
        x = _chunks_repeated(u @ att["v_proj"], n, H // KV)
        B = _chunks_repeated(u @ att["k_proj"], n, H // KV).reshape(1, l, di // n, n)
        C = (u @ w_q).reshape(1, l, di // n, n)
        y = selective_scan(jnp.asarray(x[None]), jnp.ones((1, l, di)), jnp.zeros((di, n)), jnp.asarray(B),
                           jnp.asarray(C), impl="reference")
        return np.asarray(y)[0] @ w_o

    m = params["layers_0"]["mixer"]
    w = layouts.mamba1_in_proj(m)
    np.testing.assert_allclose(scan(w[:, di + 2 * dxb:2 * di + 2 * dxb], np.asarray(m["out_proj"]["kernel"])),
                               expected, rtol=1e-4, atol=1e-4)
    literal = scan(att["q_proj"], att["o_proj"])                 # MambaInLlama: C <- W_Q, out <- W_O as they are
    if d_state == DH:
        np.testing.assert_allclose(literal, expected, rtol=1e-4, atol=1e-4)
    else:
        assert np.max(np.abs(literal - expected)) > 0.1 * np.max(np.abs(expected))


@pytest.mark.parametrize("d_state", [8, 16])
def test_default_init_makes_the_mixer_a_linear_attention(teacher_params, d_state):
    """The defaults (identity conv, Δ = 1, A = -0.01, D = 0, silu(z) = 1) make the whole student mixer the
    teacher's (sub-head) linear attention: raw q·k (B and C skip the conv in this form), silu(v) (the
    conv's activation), a 0.01 decay — written out in numpy."""
    config, params = attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[1],
                                         d_state=d_state)
    m = params["layers_1"]["mixer"]
    di, dxb = H * DH, KV * DH
    w, bias = layouts.mamba1_in_proj(m), layouts.mamba1_in_proj(m, "bias")
    np.testing.assert_array_equal(w[:, :di], 0)
    np.testing.assert_allclose(_silu(bias[:di]), 1.0, rtol=1e-6)                    # open gate: silu(z) = 1
    np.testing.assert_array_equal(bias[di:], 0)
    np.testing.assert_array_equal(w[:, 2 * di + 2 * dxb:], 0)                      # Δ: no input ...
    np.testing.assert_allclose(_softplus(np.asarray(m["dt_proj_bias"])), 1.0, rtol=1e-6)  # ... softplus = 1
    np.testing.assert_allclose(np.exp(np.asarray(m["A_log"])), 0.01, rtol=1e-6)
    np.testing.assert_array_equal(m["D"], 0)
    np.testing.assert_array_equal(m["conv1d_bias"], 0)
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (1, 8, D)))
    got = np.asarray(MambaMixer(config.mixer_config("M")).apply({"params": m}, jnp.asarray(u))[0])[0]
    att = layouts.attention(teacher_params["layers_1"]["mixer"])
    expected = _sub_head_linear_attention(u[0], att, d_state, decay=0.01, value_feature=_silu)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    for bad, match in ((dict(ssm_init="zeros"), "ssm_init"), (dict(gate_init="closed"), "gate_init"),
                       (dict(conv_init="zeros"), "conv_init"), (dict(d_state=32), "d_state")):
        with pytest.raises(ValueError, match=match):
            attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[1], **bad)


def test_gradients_reach_every_mixer_parameter(teacher_params):
    config, params = attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[0, 2])
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % 40

    def loss(p):
        logits = HybridLM(config).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    grads = jax.jit(jax.grad(loss))(params)
    for layer in ("layers_0", "layers_2"):
        norms = {"/".join(str(getattr(k, "key", k)) for k in path): float(jnp.linalg.norm(g))
                 for path, g in jax.tree_util.tree_leaves_with_path(grads[layer]["mixer"])}
        assert all(np.isfinite(v) for v in norms.values()), norms
        # dt_low = 0 at this init (its in_proj columns and bias are 0), so dt_proj_kernel's gradient
        # (dt_lowᵀ · ∂Δ) is exactly 0 until those columns move; everything else gets a gradient
        assert norms.pop("dt_proj_kernel") == 0.0
        assert all(v > 0 for v in norms.values()), norms


def test_stage_one_kd_steps_train_only_the_mamba1_mixers():
    task = MQARTask(seq_len=16, num_kv_pairs=2, vocab_size=16)
    teacher_cfg = TransformerConfig(vocab_size=task.vocab_size, d_model=32, n_layer=2, n_heads=4, n_kv_heads=2,
                                    head_dim=16, d_intermediate=48)
    teacher = TransformerLM(teacher_cfg)
    teacher_params = init_params(teacher, jax.random.PRNGKey(0))
    config, student_params = attention_to_mamba1(teacher_cfg, teacher_params, jax.random.PRNGKey(1), layers=[0])
    assert config.layer_kinds == ("M", "A")
    mask = new_mixer_mask(config, student_params)
    assert jax.tree_util.tree_all(mask["layers_0"]["mixer"])
    assert not any(jax.tree_util.tree_leaves(mask["layers_1"]) + jax.tree_util.tree_leaves(mask["layers_0"]["mlp"]))
    from mamba_jax.train import create_train_state
    state = create_train_state(HybridLM(config).apply, jax.tree_util.tree_map(jnp.copy, student_params),
                               freeze_except(optax.adam(1e-2), mask))
    step = make_kd_train_step(teacher.apply, KDConfig(kind="forward_kl", w_kl=0.1, w_ce=1.0))
    data = make_dataset(task, seed=0, batch_size=4, num_batches=6)
    batch = get_batch(data, 0)
    losses = []
    for _ in range(4):                                     # the same batch: the loss must go down
        state, metrics = step(state, teacher_params, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     state.params, student_params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda c, m: c == m or (m and not c), changed, mask))
    assert not any(jax.tree_util.tree_leaves(changed["layers_1"]))
    assert any(jax.tree_util.tree_leaves(changed["layers_0"]["mixer"]))


def test_extend_student_mamba1_form(teacher_params):
    config, params = attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), fraction=0.25, d_state=8)
    assert config.layer_kinds == ("M", "A", "A", "A")
    params = dict(params, layers_0={**params["layers_0"], "mixer": jax.tree_util.tree_map(
        lambda a: a + 0.01, params["layers_0"]["mixer"])})
    before = jax.tree_util.tree_map(np.array, params)
    new_config, new = extend_student(TEACHER, teacher_params, config, params, jax.random.PRNGKey(2), fraction=0.5)
    assert new_config.layer_kinds == ("M", "A", "M", "A") and new_config.mamba == config.mamba
    for name in new:
        if name != "layers_2":
            jax.tree_util.tree_map(np.testing.assert_array_equal, new[name], before[name])
    att = layouts.attention(teacher_params["layers_2"]["mixer"])
    m = new["layers_2"]["mixer"]
    di, dxb = H * DH, KV * DH
    w = layouts.mamba1_in_proj(m)
    np.testing.assert_array_equal(w[:, di:di + dxb], att["v_proj"])
    np.testing.assert_array_equal(w[:, di + dxb:di + 2 * dxb], att["k_proj"])
    np.testing.assert_array_equal(w[:, di + 2 * dxb:2 * di + 2 * dxb], att["q_proj"][:, _expected_q_columns(8)])
    np.testing.assert_array_equal(m["out_proj"]["kernel"], att["o_proj"][_expected_q_columns(8)])
    logits = HybridLM(new_config).apply({"params": new}, jnp.arange(12, dtype=jnp.int32)[None] % 40)
    assert logits.shape == (1, 12, 40) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="different Mamba-1 config"):
        extend_student(TEACHER, teacher_params, config, params, jax.random.PRNGKey(2), fraction=0.5, **FRESH)
    with pytest.raises(ValueError, match="must contain"):
        extend_student(TEACHER, teacher_params, new_config, new, jax.random.PRNGKey(2), layers=[0, 1])
