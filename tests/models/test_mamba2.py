"""Mamba2LM / Mamba2Mixer: official initialisation, an independent float64 recurrence, step == forward,
chunked prefill, left padding, packed sequences, ragged lengths, dtypes, bad configs and inputs."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference import generate, prefill, step
from mamba_jax.layers.mamba import LayerCache
from mamba_jax.layers.mamba2 import Mamba2Cache, Mamba2Mixer, init_mamba2_cache
from mamba_jax.models import Mamba2Config, Mamba2LM, ModelCache, init_cache, param_axes
from mamba_jax.models import init_params as _init_params
from mamba_jax.sharding import DEFAULT_RULES

# n_heads = 2·32 / 16 = 4; chunk_size 4 so that every test sequence spans several (ragged) chunks.
CONFIGS = {
    "default": Mamba2Config(vocab_size=50, d_model=32, n_layer=2, d_state=8, head_dim=16, chunk_size=4),
    "odd": Mamba2Config(vocab_size=37, d_model=24, n_layer=3, d_state=5, head_dim=6, n_groups=2, d_conv=2,
                        bias=True, conv_bias=False, dt_limit_min=0.01, dt_limit_max=0.08, chunk_size=3,
                        scan_impl="chunked"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_params(request):
    model = Mamba2LM(CONFIGS[request.param])
    return model, perturbed(init_params(model, jax.random.PRNGKey(0)), seed=1)


# Compiled: eager initialisation dispatches (and compiles) every op of the forward one by one.
init_params = jax.jit(_init_params, static_argnums=(0, 2))


@functools.partial(jax.jit, static_argnums=1)
def perturbed(params, seed):
    """Every parameter moved off its init (D, norm weights, A_log and dt_bias included)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, new)


def ids(seed, b, l, vocab):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, vocab)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, input_ids, seq_idx=None):
    """Logits (b, l, vocab) of the parallel forward (compiled once per model and shape)."""
    return model.apply({"params": params}, input_ids, seq_idx=seq_idx)


# --------------------------------------------------------------------------------------------------
# Initialisation, shapes, dtypes, logical axes
# --------------------------------------------------------------------------------------------------

def test_official_initialisation():
    cfg = Mamba2Config(vocab_size=50, d_model=128, n_layer=3, d_state=8, head_dim=4)  # 64 heads
    mixer = init_params(Mamba2LM(cfg), jax.random.PRNGKey(0))["layers_1"]["mixer"]
    h, di, k = cfg.n_heads, cfg.d_inner, cfg.d_conv
    assert mixer["A_log"].shape == mixer["dt_bias"].shape == mixer["D"].shape == (h,) == (64,)
    A = -np.exp(np.asarray(mixer["A_log"], np.float64))
    assert A.min() >= -16 * 1.0001 and A.max() <= -1 / 1.0001
    assert A.min() < -12 and A.max() > -5  # uniform over [-16, -1], not a constant
    dt = np.log1p(np.exp(np.asarray(mixer["dt_bias"], np.float64)))  # softplus(bias) = initial dt
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert dt.max() / dt.min() > 10  # log-uniform over two decades
    np.testing.assert_array_equal(mixer["D"], np.ones(h))
    np.testing.assert_array_equal(mixer["norm_weight"], np.ones(di))
    # the official fused in_proj [z | x | B | C | dt] and conv over [x | B | C], stored as pieces
    assert mixer["conv1d_x_kernel"].shape == (k, di) and mixer["conv1d_bc_kernel"].shape == (k, 2 * 8)
    for name in ("conv1d_x_kernel", "conv1d_bc_kernel"):
        assert np.abs(mixer[name]).max() <= 1 / math.sqrt(k)
    shapes = {name: mixer[name]["kernel"].shape for name in ("in_proj_zx", "in_proj_bc", "in_proj_dt")}
    assert shapes == {"in_proj_zx": (2, 128, di), "in_proj_bc": (2, 128, 8), "in_proj_dt": (128, h)}
    for name in shapes:
        assert np.abs(mixer[name]["kernel"]).max() <= 1 / math.sqrt(128)
        assert "bias" not in mixer[name]
    out_bound = 1 / math.sqrt(di) / math.sqrt(cfg.n_layer)
    assert out_bound * 0.9 < np.abs(mixer["out_proj"]["kernel"]).max() <= out_bound
    assert "bias" not in mixer["out_proj"]


def test_every_param_has_logical_axes_from_the_rules():
    model = Mamba2LM(CONFIGS["odd"])
    params = init_params(model, jax.random.PRNGKey(0))
    axes = param_axes(model)
    known = {name for name, _ in DEFAULT_RULES}
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=is_spec)
    assert jax.tree_util.tree_structure(axes, is_leaf=is_spec) == jax.tree_util.tree_structure(params)
    for spec, p in zip(flat_axes, jax.tree_util.tree_leaves(params)):
        assert len(spec) == p.ndim and all(a is None or a in known for a in spec), spec
    mixer_axes = axes["layers_0"]["mixer"]
    assert tuple(mixer_axes["A_log"]) == tuple(mixer_axes["dt_bias"]) == tuple(mixer_axes["D"]) == ("heads",)
    # pieces of equal width share a kernel; tensor parallelism cuts each along its width, never between them
    assert tuple(mixer_axes["in_proj_zx"]["kernel"]) == (None, "embed", "mlp")
    assert tuple(mixer_axes["in_proj_bc"]["kernel"]) == (None, "embed", None)
    assert tuple(mixer_axes["in_proj_dt"]["kernel"]) == ("embed", "heads")
    assert tuple(mixer_axes["conv1d_x_kernel"]) == ("conv", "mlp") and tuple(mixer_axes["conv1d_bc_kernel"]) == ("conv", None)
    assert tuple(mixer_axes["out_proj"]["kernel"]) == ("mlp", "embed")


def test_mixer_shapes_and_cache_shapes():
    cfg = CONFIGS["odd"]
    mixer = Mamba2Mixer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, cfg.d_model))
    params = jax.jit(mixer.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(mixer.apply)
    out, cache = apply(params, x)
    assert out.shape == x.shape and out.dtype == jnp.float32 and cache is None
    fresh = init_mamba2_cache(cfg, 3)
    assert fresh.conv_state.shape == (3, cfg.d_conv - 1, cfg.d_inner + 2 * cfg.n_groups * cfg.d_state)
    assert fresh.ssm_state.shape == (3, cfg.n_heads, cfg.head_dim, cfg.d_state)
    out2, cache = apply(params, x, cache=fresh)
    np.testing.assert_allclose(out2, out, atol=1e-6)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), cache) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), fresh)


def test_bfloat16_forward_and_cache_dtypes(model_and_params):
    model, params = model_and_params
    dtype = "bfloat16"
    cfg = model.config.replace(dtype=dtype)
    x = ids(1, 2, 9, cfg.vocab_size)
    logits = forward(model, params, x)
    low = forward(Mamba2LM(cfg), params, x)
    assert low.dtype == jnp.float32 and not jnp.any(jnp.isnan(low))
    np.testing.assert_allclose(low, logits, atol=0.05 * float(jnp.abs(logits).max()))
    cache = init_cache(cfg, 2)
    assert cache.layers[0].conv_state.dtype == jnp.dtype(dtype) and cache.layers[0].ssm_state.dtype == jnp.float32
    _, after_prefill = prefill(Mamba2LM(cfg), params, x, cache)
    _, after_step = step(Mamba2LM(cfg), params, x[:, 0], after_prefill)
    expect = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), cache)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), after_prefill) == expect
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), after_step) == expect


# --------------------------------------------------------------------------------------------------
# The mixer against an independent float64 loop of the official recurrence
# --------------------------------------------------------------------------------------------------

def _silu(x):
    return x / (1 + np.exp(-x))


def reference_mixer(p, x, cfg: Mamba2Config):
    """The official Mamba-2 block in float64 numpy, one time step and one head at a time.

    p: our mixer params; x: (b, l, d_model). in_proj → [z, xBC, dt]; causal depthwise conv + SiLU over
    xBC; h ← exp(Δ A) h + Δ x Bᵀ, y = h C + D x per head (B, C of the head's group); grouped gated
    RMSNorm; out_proj.
    """
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    b, l, _ = x.shape
    di, n, g, h, hd, k = cfg.d_inner, cfg.d_state, cfg.n_groups, cfg.n_heads, cfg.head_dim, cfg.d_conv
    # the pieces re-fused in the official column order: in_proj [z | x | B | C | dt], conv over [x | B | C]
    zx, bc, dtp = p["in_proj_zx"], p["in_proj_bc"], p["in_proj_dt"]
    w = np.concatenate([zx["kernel"][0], zx["kernel"][1], bc["kernel"][0], bc["kernel"][1], dtp["kernel"]], axis=1)
    bias = np.concatenate([zx["bias"][0], zx["bias"][1], bc["bias"][0], bc["bias"][1], dtp["bias"]]) if cfg.bias else 0.0
    conv_w = np.concatenate([p["conv1d_x_kernel"], p["conv1d_bc_kernel"]], axis=1)
    conv_b = np.concatenate([p["conv1d_x_bias"], p["conv1d_bc_bias"]]) if cfg.conv_bias else 0.0
    proj = x @ w + bias
    z, xbc, dt = proj[..., :di], proj[..., di:di + cfg.conv_dim], proj[..., di + cfg.conv_dim:]
    assert dt.shape[-1] == h
    conv = np.zeros_like(xbc) + conv_b
    for t in range(l):
        for j in range(k):  # kernel tap j multiplies the input k-1-j steps back
            if t - (k - 1 - j) >= 0:
                conv[:, t] += conv_w[j] * xbc[:, t - (k - 1 - j)]
    xbc = _silu(conv)
    xs = xbc[..., :di].reshape(b, l, h, hd)
    B = xbc[..., di:di + g * n].reshape(b, l, g, n)
    C = xbc[..., di + g * n:].reshape(b, l, g, n)
    delta = np.log1p(np.exp(dt + p["dt_bias"]))
    delta = np.clip(delta, cfg.dt_limit_min, np.inf if cfg.dt_limit_max is None else cfg.dt_limit_max)
    A = -np.exp(p["A_log"])
    state = np.zeros((b, h, hd, n))
    y = np.zeros((b, l, h, hd))
    for t in range(l):
        for head in range(h):
            grp = head // (h // g)
            d_t = delta[:, t, head][:, None, None]
            state[:, head] = (np.exp(d_t * A[head]) * state[:, head]
                              + d_t * xs[:, t, head][:, :, None] * B[:, t, grp][:, None, :])
            y[:, t, head] = np.einsum("bpn,bn->bp", state[:, head], C[:, t, grp]) + p["D"][head] * xs[:, t, head]
    y = y.reshape(b, l, di)
    if not cfg.norm_before_gate:
        y = y * _silu(z)
    grouped = y.reshape(b, l, g, di // g)
    grouped = grouped / np.sqrt(np.mean(grouped ** 2, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    y = grouped.reshape(b, l, di) * p["norm_weight"]
    if cfg.norm_before_gate:
        y = y * _silu(z)
    return y @ p["out_proj"]["kernel"] + (p["out_proj"]["bias"] if cfg.bias else 0.0)


REFERENCE_CASES = {
    "g1": dict(),
    "g2_bias_limits": dict(n_groups=2, bias=True, conv_bias=False, dt_limit_min=0.02, dt_limit_max=0.3),
    "g2_norm_before_gate_k2": dict(n_groups=2, norm_before_gate=True, d_conv=2),
    "g4_reference_impl": dict(n_groups=4, scan_impl="reference", d_conv=3),
    "g2_pallas_impl": dict(n_groups=2, scan_impl="pallas"),  # the Pallas kernel, interpreted on CPU
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_mixer_equals_float64_recurrence(case):
    cfg = Mamba2Config(vocab_size=16, d_model=12, n_layer=2, d_state=5, head_dim=6, chunk_size=4,
                       dtype="float64", param_dtype="float64", **REFERENCE_CASES[case])
    assert cfg.n_heads == 4
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, cfg.d_model), jnp.float64)
        mixer = Mamba2Mixer(cfg)
        params = perturbed(nn.meta.unbox(jax.jit(mixer.init)(jax.random.PRNGKey(1), x)["params"]), 2)
        params["dt_bias"] = params["dt_bias"] + 4.0  # Δ ~ 0.05..2: strong, varied decays (and clamps)
        out, _ = jax.jit(mixer.apply)({"params": params}, x)
        assert out.dtype == jnp.float64
        expected = reference_mixer(params, x, cfg)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10, atol=1e-10)


def test_dt_limit_clamps():
    """The upper limit changes the output (so the reference test above exercises the clamp)."""
    base = Mamba2Config(vocab_size=16, d_model=12, n_layer=1, d_state=5, head_dim=6, chunk_size=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 12))
    params = jax.jit(Mamba2Mixer(base).init)(jax.random.PRNGKey(1), x)["params"]
    free, _ = jax.jit(Mamba2Mixer(base).apply)({"params": params}, x)
    clamped, _ = jax.jit(Mamba2Mixer(base.replace(dt_limit_max=1e-4)).apply)({"params": params}, x)
    assert np.abs(np.asarray(free) - np.asarray(clamped)).max() > 1e-4


# --------------------------------------------------------------------------------------------------
# Caches, padding, packing, ragged lengths (through Mamba2LM)
# --------------------------------------------------------------------------------------------------

def test_step_by_step_equals_parallel_forward(model_and_params):
    model, params = model_and_params
    x = ids(1, 3, 14, model.config.vocab_size)
    full = forward(model, params, x)
    cache = init_cache(model.config, 3)
    logits = []
    for t in range(14):
        lg, cache = step(model, params, x[:, t], cache)
        logits.append(lg)
    assert float(jnp.abs(full).max()) > 0.5
    np.testing.assert_allclose(jnp.stack(logits, 1), full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_full_prefill(model_and_params):
    model, params = model_and_params
    x = ids(2, 2, 19, model.config.vocab_size)
    full_logits, full_cache = prefill(model, params, x)
    l1, c1 = prefill(model, params, x[:, :6])
    l2, c2 = prefill(model, params, x[:, 6:], c1)
    np.testing.assert_allclose(jnp.concatenate([l1, l2], 1), full_logits, rtol=1e-5, atol=1e-5)
    assert isinstance(c2.layers[0], Mamba2Cache)
    for a, b in zip(jax.tree_util.tree_leaves(c2), jax.tree_util.tree_leaves(full_cache)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the cache then decodes like the parallel forward of the longer sequence
    nxt = ids(3, 2, 1, model.config.vocab_size)
    step_logits, _ = step(model, params, nxt[:, 0], c2)
    np.testing.assert_allclose(step_logits, forward(model, params, jnp.concatenate([x, nxt], 1))[:, -1],
                               rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_each_sequence_alone(model_and_params):
    model, params = model_and_params
    vocab = model.config.vocab_size
    prompts = [ids(10 + i, 1, length, vocab)[0] for i, length in enumerate([9, 1])]
    width = max(len(p) for p in prompts)
    batch = jnp.stack([jnp.concatenate([jnp.full(width - len(p), 3), p]) for p in prompts])
    mask = jnp.stack([jnp.arange(width) >= width - len(p) for p in prompts]).astype(jnp.int32)
    batch_logits, _ = prefill(model, params, batch, None, mask)
    batch_tokens = generate(model, params, batch, 12, temperature=0.0, prompt_mask=mask)
    for i, p in enumerate(prompts):
        alone_logits, _ = prefill(model, params, p[None])
        np.testing.assert_allclose(batch_logits[i, width - len(p):], alone_logits[0], rtol=1e-5, atol=1e-5)
        alone_tokens = generate(model, params, p[None], 12, temperature=0.0)
        np.testing.assert_array_equal(batch_tokens[i], alone_tokens[0])
    # without the mask the pads do change the short rows (the test can fail)
    unmasked, _ = prefill(model, params, batch)
    assert np.abs(np.asarray(unmasked[1, -1] - batch_logits[1, -1])).max() > 1e-3


@pytest.mark.parametrize("impl", ["reference", "chunked", "pallas"])
def test_packed_sequences_equal_separate_runs(model_and_params, impl):
    model, params = model_and_params
    model = Mamba2LM(model.config.replace(scan_impl=impl))
    vocab = model.config.vocab_size
    parts = [ids(20, 1, 7, vocab), ids(21, 1, 2, vocab), ids(22, 1, 10, vocab)]
    packed = jnp.concatenate(parts, axis=1)
    seq_idx = jnp.asarray([[0] * 7 + [1] * 2 + [2] * 10], jnp.int32)
    logits = forward(model, params, packed, seq_idx)
    start = 0
    for part in parts:
        alone = forward(model, params, part)
        np.testing.assert_allclose(logits[:, start:start + part.shape[1]], alone, rtol=1e-5, atol=1e-5)
        start += part.shape[1]
    assert np.abs(np.asarray(forward(model, params, packed)[:, 7:] - logits[:, 7:])).max() > 1e-3


def test_ragged_lengths_are_causal_and_impls_agree(model_and_params):
    """Lengths that are not multiples of chunk_size: every prefix gives the first logits of the longest
    sequence, and the chunked SSD equals the sequential reference."""
    model, params = model_and_params
    x = ids(5, 2, 13, model.config.vocab_size)
    chunked = Mamba2LM(model.config.replace(scan_impl="chunked"))
    reference = Mamba2LM(model.config.replace(scan_impl="reference"))
    full = forward(chunked, params, x)
    np.testing.assert_allclose(forward(reference, params, x), full, rtol=1e-5, atol=1e-5)
    for l in (1, 5, 10):
        prefix = forward(chunked, params, x[:, :l])
        np.testing.assert_allclose(prefix, full[:, :l], rtol=1e-5, atol=1e-5, err_msg=f"length {l}")


def test_hidden_states_and_untied_head():
    cfg = CONFIGS["default"].replace(tie_embeddings=False, n_layer=1)
    model = Mamba2LM(cfg)
    params = init_params(model, jax.random.PRNGKey(3))
    assert params["lm_head"]["kernel"].shape == (32, 56)
    out = jax.jit(functools.partial(model.apply, return_hidden_states=True, method="forward"))({"params": params}, ids(6, 2, 5, 50))
    assert out.logits.shape == (2, 5, 50) and len(out.hidden_states) == 2


# --------------------------------------------------------------------------------------------------
# Bad configs and inputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=32, head_dim=24), r"multiple of `head_dim`=24"),
    (dict(d_model=32, head_dim=16, n_groups=3), r"`n_groups`=3 must divide n_heads = 4"),
    (dict(head_dim=0), "`head_dim` must be a positive int"),
    (dict(chunk_size=0), "`chunk_size` must be a positive int"),
    (dict(A_init_min=0.0), "A_init_min"),
    (dict(scan_impl="magic"), "`scan_impl` must be one of"),
    (dict(dt_min=0.2, dt_max=0.1), r"`dt_min` <= `dt_max`.*dt_min=0.2 > dt_max=0.1"),
    (dict(dt_min=0.0), "`dt_min` must be a number > 0"),
    (dict(dt_init_floor=-1e-4), "`dt_init_floor` must be a number > 0"),
    (dict(dt_limit_min=0.5, dt_limit_max=0.1), "dt_limit_min"),
    (dict(gated_norm_eps=0.0), "`gated_norm_eps` must be a number > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**kwargs)


def test_bad_cache_is_named_with_expected_shape(model_and_params):
    model, params = model_and_params
    cfg = model.config
    good = init_cache(cfg, 2)
    x = ids(7, 2, 1, cfg.vocab_size)
    wrong_state = good.layers[0]._replace(ssm_state=jnp.zeros((2, cfg.n_heads, cfg.d_state, cfg.head_dim)))
    bad = ModelCache((wrong_state,) + good.layers[1:], good.positions)
    expected = rf"\(2, {cfg.n_heads}, {cfg.head_dim}, {cfg.d_state}\)"
    with pytest.raises(ValueError, match=rf"`cache.ssm_state` must have shape {expected}"):
        model.apply({"params": params}, x, cache=bad, method="forward")
    mamba1 = ModelCache((LayerCache(*good.layers[0]),) + good.layers[1:], good.positions)
    with pytest.raises(ValueError, match="`cache` must be a Mamba2Cache"):
        model.apply({"params": params}, x, cache=mamba1, method="forward")


def test_bad_mixer_input_is_named():
    cfg = CONFIGS["default"]
    mixer = Mamba2Mixer(cfg)
    x = jnp.zeros((1, 3, cfg.d_model))
    params = mixer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"`x` must have shape \(b, l, 32\)"):
        mixer.apply(params, jnp.zeros((1, 3, 31)))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(1, 3\)"):
        mixer.apply(params, x, mask=jnp.ones((1, 4)))


def test_config_names_match_hf_and_old_saved_names_still_load():
    cfg = Mamba2Config(d_model=32, head_dim=16, n_groups=2)
    assert (cfg.n_heads, cfg.head_dim, cfg.n_groups) == (4, 16, 2)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("head_dim", "n_groups")}
    assert Mamba2Config.from_dict({**old, "headdim": 16, "ngroups": 2}) == cfg   # saved before the rename
    old = {k: v for k, v in cfg.to_dict().items() if k != "scan_impl"}
    assert Mamba2Config.from_dict({**old, "ssd_impl": "auto"}) == cfg
    with pytest.raises(TypeError):
        Mamba2Config(headdim=16)
