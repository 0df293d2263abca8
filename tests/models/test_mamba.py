"""MambaLM: official initialisation, shapes/dtypes, logical axes, packed sequences, hidden states."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.models import MambaConfig, MambaLM, init_cache, init_params, param_axes
from mamba_jax.ops import rms_norm
from mamba_jax.sharding import DEFAULT_RULES

CFG = MambaConfig(vocab_size=50, d_model=48, n_layer=3, d_state=8)


@pytest.fixture(scope="module")
def params():
    return init_params(MambaLM(CFG), jax.random.PRNGKey(0))


def ids(seed, b, l, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, vocab)


def test_official_initialisation(params):
    mixer = params["layers_1"]["mixer"]
    di, n, r = CFG.d_inner, CFG.d_state, CFG.dt_rank_value
    assert r == math.ceil(48 / 16)
    np.testing.assert_allclose(mixer["A_log"], np.broadcast_to(np.log(np.arange(1, n + 1)), (di, n)), rtol=1e-6)
    np.testing.assert_array_equal(mixer["D"], np.ones(di))
    dt = np.log1p(np.exp(np.asarray(mixer["dt_proj_bias"], np.float64)))  # softplus(bias) = initial dt
    assert dt.min() >= CFG.dt_min * 0.999 and dt.max() <= CFG.dt_max * 1.001
    assert np.abs(mixer["dt_proj_kernel"]).max() <= r ** -0.5
    out_bound = 1 / math.sqrt(di) / math.sqrt(CFG.n_layer)
    assert np.abs(mixer["out_proj"]["kernel"]).max() <= out_bound
    assert np.abs(mixer["out_proj"]["kernel"]).max() > 0.9 * out_bound  # uniform fills its range
    assert np.abs(mixer["conv1d_kernel"]).max() <= 1 / math.sqrt(CFG.d_conv)
    emb = np.asarray(params["embeddings"]["embedding"])
    assert emb.shape == (56, 48)  # vocab 50 padded to a multiple of 8
    assert abs(emb.std() - 0.02) < 0.002
    np.testing.assert_array_equal(params["norm_f"]["weight"], np.ones(48))
    assert "in_proj" in mixer and "bias" not in mixer["in_proj"]  # bias=False by default


def test_logits_shape_dtype_and_bf16(params):
    x = ids(1, 2, 17)
    logits = MambaLM(CFG).apply({"params": params}, x)
    assert logits.shape == (2, 17, 50) and logits.dtype == jnp.float32
    bf16 = MambaLM(CFG.replace(dtype="bfloat16"))
    logits_bf16 = bf16.apply({"params": params}, x)
    assert logits_bf16.dtype == jnp.float32 and not jnp.any(jnp.isnan(logits_bf16))
    np.testing.assert_allclose(logits_bf16, logits, atol=0.05 * float(jnp.abs(logits).max()))


def test_every_param_has_logical_axes_from_the_rules(params):
    axes = param_axes(MambaLM(CFG))
    known = {name for name, _ in DEFAULT_RULES}
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = jax.tree_util.tree_leaves(params)
    assert len(flat_axes) == len(flat_params)
    for spec, p in zip(flat_axes, flat_params):
        assert len(spec) == p.ndim
        assert all(a is None or a in known for a in spec), spec


def test_hidden_states_and_final_norm(params):
    model = MambaLM(CFG)
    out = model.apply({"params": params}, ids(2, 2, 9), return_hidden_states=True, method="forward")
    assert len(out.hidden_states) == CFG.n_layer + 1
    assert all(h.shape == (2, 9, 48) and h.dtype == jnp.float32 for h in out.hidden_states)
    np.testing.assert_allclose(out.hidden_states[0], params["embeddings"]["embedding"][ids(2, 2, 9)], rtol=1e-6)
    normed = rms_norm(out.hidden_states[-1], params["norm_f"]["weight"], CFG.rms_norm_eps)
    expected = normed @ params["embeddings"]["embedding"][:50].T  # tied head
    np.testing.assert_allclose(out.logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "associative", "chunked"])
def test_packed_sequences_equal_separate_runs(params, impl):
    model = MambaLM(CFG.replace(scan_impl=impl, chunk_size=4))
    a, b = ids(3, 1, 7), ids(4, 1, 12)
    packed = jnp.concatenate([a, b], axis=1)
    seq_idx = jnp.asarray([[0] * 7 + [1] * 12], jnp.int32)
    logits = model.apply({"params": params}, packed, seq_idx=seq_idx)
    np.testing.assert_allclose(logits[:, :7], model.apply({"params": params}, a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 7:], model.apply({"params": params}, b), atol=1e-5)


def test_untied_head_and_biases():
    cfg = CFG.replace(tie_embeddings=False, bias=True, conv_bias=False, n_layer=1)
    p = init_params(MambaLM(cfg), jax.random.PRNGKey(1))
    assert p["lm_head"]["kernel"].shape == (48, 56)
    assert "bias" in p["layers_0"]["mixer"]["in_proj"] and "conv1d_bias" not in p["layers_0"]["mixer"]
    assert MambaLM(cfg).apply({"params": p}, ids(5, 1, 4)).shape == (1, 4, 50)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=0), "`d_model` must be a positive int"),
    (dict(dt_rank=-1), "`dt_rank` must be 'auto' or a positive int"),
    (dict(dtype="int8"), "`dtype` must be one of"),
    (dict(scan_impl="magic"), "`scan_impl` must be one of"),
    (dict(dt_min=0.2, dt_max=0.1), r"`dt_min` <= `dt_max`.*dt_min=0.2 > dt_max=0.1"),
    (dict(dt_min=0.0), "`dt_min` must be a number > 0"),
    (dict(dt_max=-1.0), "`dt_max` must be a number > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**kwargs)


def test_bad_model_inputs(params):
    model = MambaLM(CFG)
    with pytest.raises(ValueError, match="`input_ids` must be an integer array"):
        model.apply({"params": params}, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \(b, l\)"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(1, 4\)"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), mask=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="`cache` must be a ModelCache with 3 layer caches"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), cache=(), method="forward")
    with pytest.raises(ValueError, match=r"`cache` and `return_hidden_states` are arguments of `forward`"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), cache=init_cache(model.config, 1))
