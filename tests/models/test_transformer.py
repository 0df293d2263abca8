"""TransformerLM and the Attention layer: KV-cache decoding == forward, chunked prefill, left padding,
packed sequences, GQA head mapping, init, and bad configs/inputs."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference import generate, prefill, step
from mamba_jax.layers.attention import KVCache, init_kv_cache
from mamba_jax.models import TransformerConfig, TransformerLM, init_cache, init_params, param_axes
from mamba_jax.sharding import DEFAULT_RULES

BASE = dict(vocab_size=45, d_model=32, n_layer=2, d_intermediate=48, n_heads=4)
CONFIGS = {
    "rope_mha": TransformerConfig(**BASE),
    "rope_gqa_bias_hd12": TransformerConfig(**{**BASE, "n_kv_heads": 2, "head_dim": 12, "attention_bias": True,
                                               "rope_theta": 500.0, "tie_embeddings": False}),
    "rope_mqa_3layers": TransformerConfig(**{**BASE, "n_layer": 3, "n_kv_heads": 1, "mlp_bias": True}),
    "learned_gqa": TransformerConfig(**{**BASE, "n_kv_heads": 2, "position_embedding": "learned",
                                        "max_position_embeddings": 64}),
    "nopos": TransformerConfig(**{**BASE, "position_embedding": "none"}),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def random_params(model, seed):
    """Random parameters of the model's shapes, drawn with numpy (compiling `init` costs seconds): matrices
    N(0, 1/fan_in), norm weights 1 + N(0, 0.3²), biases N(0, 0.3²) — larger than the init, so attention
    patterns are far from uniform and a wrong mask or position shows up."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
    r = np.random.RandomState(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 2:
            return jnp.asarray(r.randn(*leaf.shape) / np.sqrt(leaf.shape[0]), leaf.dtype)
        return jnp.asarray(("norm" in name) + 0.3 * r.randn(*leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@functools.partial(jax.jit, static_argnums=0)
def init_jit(model):
    """`init_params(model, PRNGKey(0))`, compiled."""
    return init_params(model, jax.random.PRNGKey(0))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_params(request):
    model = TransformerLM(CONFIGS[request.param])
    return model, random_params(model, 0)


def ids(seed, b, l, vocab=BASE["vocab_size"]):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, vocab)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, x, positions=None, seq_idx=None, mask=None, cache=None):
    out = model.apply({"params": params}, x, positions=positions, seq_idx=seq_idx, mask=mask, cache=cache,
                      method="forward")
    return out.logits if cache is None else out


def only(*names):
    """Run a (slower, compile-heavy) test on a subset of CONFIGS."""
    return pytest.mark.parametrize("model_and_params", names, indirect=True)


def test_step_by_step_equals_forward(model_and_params):
    model, params = model_and_params
    x = ids(1, 3, 13)
    full = forward(model, params, x)
    assert float(jnp.abs(full).max()) > 0.5
    cache = init_cache(model.config, 3, 16)
    logits = []
    for t in range(13):
        lg, cache = step(model, params, x[:, t], cache)
        logits.append(lg)
    np.testing.assert_allclose(jnp.stack(logits, 1), full, **TOL)
    assert int(cache.layers[0].index) == 13 and cache.positions.tolist() == [13] * 3


@only("rope_gqa_bias_hd12", "rope_mqa_3layers", "learned_gqa")
def test_chunked_prefill_equals_full_prefill(model_and_params):
    model, params = model_and_params
    x = ids(2, 2, 17)
    full_logits, full_cache = prefill(model, params, x, max_len=20)
    l1, c1 = prefill(model, params, x[:, :6], max_len=20)
    l2, c2 = prefill(model, params, x[:, 6:11], c1)
    l3, c3 = prefill(model, params, x[:, 11:], c2)
    np.testing.assert_allclose(jnp.concatenate([l1, l2, l3], 1), full_logits, **TOL)
    for a, b in zip(jax.tree_util.tree_leaves(c3), jax.tree_util.tree_leaves(full_cache)):
        np.testing.assert_allclose(a, b, **TOL)
    nxt = ids(3, 2, 1)
    step_logits, _ = step(model, params, nxt[:, 0], c3)
    np.testing.assert_allclose(step_logits, forward(model, params, jnp.concatenate([x, nxt], 1))[:, -1], **TOL)


@only("rope_gqa_bias_hd12", "learned_gqa")
def test_left_padded_batch_equals_each_sequence_alone(model_and_params):
    model, params = model_and_params
    prompts = [ids(10 + i, 1, n)[0] for i, n in enumerate([9, 3, 6])]
    width, new = max(len(p) for p in prompts), 10
    batch = jnp.stack([jnp.concatenate([jnp.full(width - len(p), 7), p]) for p in prompts])
    mask = jnp.stack([jnp.arange(width) >= width - len(p) for p in prompts]).astype(jnp.int32)
    no_cache = forward(model, params, batch, mask=mask)
    batch_logits, _ = prefill(model, params, batch, None, mask)
    batch_tokens = generate(model, params, batch, new, temperature=0.0, prompt_mask=mask)
    assert len(np.unique(np.asarray(batch_tokens))) > 3
    for i, p in enumerate(prompts):
        # the row alone, teacher-forced on the tokens the padded batch generated: its logits equal the
        # padded row's, and its greedy choice at every step is the token the batch produced
        alone = forward(model, params, jnp.concatenate([p, batch_tokens[i]])[None])[0]
        np.testing.assert_allclose(no_cache[i, width - len(p):], alone[:len(p)], **TOL)
        np.testing.assert_allclose(batch_logits[i, width - len(p):], alone[:len(p)], **TOL)
        np.testing.assert_array_equal(batch_tokens[i], jnp.argmax(alone[len(p) - 1:-1], -1))
    shortest = prompts[1]
    np.testing.assert_array_equal(batch_tokens[1], generate(model, params, shortest[None], new, temperature=0.0)[0])


def test_packed_sequences_equal_separate_runs(model_and_params):
    model, params = model_and_params
    a, b, c = ids(5, 1, 7), ids(6, 1, 4), ids(7, 1, 6)
    packed = jnp.concatenate([a, b, c], 1)
    seq_idx = jnp.asarray([[3] * 7 + [1] * 4 + [3] * 6], jnp.int32)  # ids may repeat: changes start sequences
    logits = forward(model, params, packed, seq_idx=seq_idx)
    np.testing.assert_allclose(logits[:, :7], forward(model, params, a), **TOL)
    np.testing.assert_allclose(logits[:, 7:11], forward(model, params, b), **TOL)
    np.testing.assert_allclose(logits[:, 11:], forward(model, params, c), **TOL)
    # Through a KV cache in two chunks (the second chunk's first segment continues the cached one). The
    # positions are given: they restart at 0 in each packed sequence.
    positions = jnp.asarray([list(range(7)) + list(range(4)) + list(range(6))], jnp.int32)
    cache = init_cache(model.config, 1, 20)
    out1 = forward(model, params, packed[:, :9], positions=positions[:, :9], seq_idx=seq_idx[:, :9], cache=cache)
    out2 = forward(model, params, packed[:, 9:], positions=positions[:, 9:], seq_idx=seq_idx[:, 9:],
                   cache=out1.cache)
    np.testing.assert_allclose(jnp.concatenate([out1.logits, out2.logits], 1), logits, **TOL)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head i reads kv head i // (n_heads / n_kv_heads): an MHA model whose k/v projections repeat
    each kv head's columns that many times gives the same logits."""
    gqa_cfg = CONFIGS["rope_gqa_bias_hd12"]
    mha_cfg = gqa_cfg.replace(n_kv_heads=None)
    params = random_params(TransformerLM(gqa_cfg), 3)
    mha = jax.tree_util.tree_map(lambda x: x, params)
    g = gqa_cfg.n_heads // gqa_cfg.kv_heads
    for i in range(gqa_cfg.n_layer):
        mixer = mha[f"layers_{i}"]["mixer"]
        for name in ("k_proj", "v_proj"):
            for leaf in ("kernel", "bias"):         # (..., kv_heads, dh): repeat each head g times
                mixer[name][leaf] = jnp.repeat(mixer[name][leaf], g, axis=-2)
    x = ids(8, 2, 9)
    np.testing.assert_allclose(forward(TransformerLM(mha_cfg), mha, x), forward(TransformerLM(gqa_cfg), params, x),
                               **TOL)


def test_rope_logits_do_not_depend_on_absolute_offset():
    cfg = CONFIGS["rope_mha"]
    model = TransformerLM(cfg)
    params = random_params(model, 0)
    x = ids(9, 1, 8)
    base = jnp.arange(8, dtype=jnp.int32)[None]
    np.testing.assert_allclose(forward(model, params, x, positions=base + 100), forward(model, params, x),
                               rtol=1e-4, atol=1e-4)
    # ... but do depend on the positions themselves (a different spacing changes them)
    assert not np.allclose(forward(model, params, x, positions=base * 2), forward(model, params, x), atol=1e-3)


def test_initialisation_and_logical_axes():
    cfg = CONFIGS["rope_gqa_bias_hd12"].replace(d_model=64, n_heads=8, n_kv_heads=4, initializer_range=0.05)
    model = TransformerLM(cfg)
    params = init_jit(model)
    mixer = params["layers_0"]["mixer"]
    assert mixer["q_proj"]["kernel"].shape == (64, 8, 12) and mixer["k_proj"]["kernel"].shape == (64, 4, 12)
    assert mixer["o_proj"]["kernel"].shape == (8, 12, 64) and mixer["q_proj"]["bias"].shape == (8, 12)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert abs(float(jnp.std(mixer[name]["kernel"])) - 0.05) < 0.006, name
        np.testing.assert_array_equal(mixer[name]["bias"], 0)
    axes = param_axes(model)
    assert tuple(axes["layers_0"]["mixer"]["q_proj"]["kernel"]) == ("embed", "heads", None)     # whole heads
    assert tuple(axes["layers_0"]["mixer"]["k_proj"]["kernel"]) == ("embed", "kv_heads", None)
    assert tuple(axes["layers_0"]["mixer"]["o_proj"]["kernel"]) == ("heads", None, "embed")
    known = {name for name, _ in DEFAULT_RULES}
    for spec in jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert all(a is None or a in known for a in spec), spec
    assert "bias" not in init_jit(TransformerLM(CONFIGS["rope_mha"]))[
        "layers_0"]["mixer"]["q_proj"]


def test_bfloat16_model_and_cache():
    cfg = CONFIGS["rope_gqa_bias_hd12"]
    params = init_jit(TransformerLM(cfg))
    bf = TransformerLM(cfg.replace(dtype="bfloat16"))
    cache = init_cache(bf.config, 2, 8)
    assert cache.layers[0].key.dtype == jnp.bfloat16 and cache.layers[0].valid.dtype == jnp.bool_
    x = ids(11, 2, 6)
    logits, cache = prefill(bf, params, x, cache)
    ref = forward(TransformerLM(cfg), params, x)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, ref, atol=0.05 * float(jnp.abs(ref).max()))
    assert cache.layers[1].value.dtype == jnp.bfloat16


def test_cache_overflow_is_an_error_and_nan_under_jit():
    """From Python, `step`/`prefill` read the cache index and refuse a token that does not fit; inside jit
    (where the index is traced) the overflowing step gives NaN logits, never silently overwritten slots."""
    from mamba_jax import inference
    cfg = CONFIGS["rope_mha"]
    model = TransformerLM(cfg)
    params = init_jit(model)
    logits, cache = prefill(model, params, ids(12, 1, 4), max_len=5)
    ok, cache = step(model, params, jnp.asarray([1]), cache)
    assert bool(jnp.all(jnp.isfinite(ok)))
    with pytest.raises(ValueError, match=r"step: the KV cache holds 5 slots, 5 of them used: no room for 1 more token\(s\)"):
        step(model, params, jnp.asarray([1]), cache)
    with pytest.raises(ValueError, match=r"prefill: the KV cache holds 5 slots, 5 of them used: no room for 2 more"):
        prefill(model, params, ids(12, 1, 2), cache)
    over, _ = inference._step(model, params, jnp.asarray([1]), cache)   # the jitted step, as `generate` runs it
    assert bool(jnp.all(jnp.isnan(over)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=4, n_kv_heads=3), "`n_kv_heads`=3 must divide `n_heads`=4"),
    (dict(n_heads=4, head_dim=7), "rotary embeddings need an even head_dim; got 7"),
    (dict(d_model=30, n_heads=4), "`d_model`=30 is not divisible by `n_heads`=4"),
    (dict(position_embedding="alibi"), "`position_embedding` must be one of"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**BASE, **kwargs})


def test_odd_head_dim_is_fine_without_rope():
    cfg = TransformerConfig(**{**BASE, "head_dim": 7, "position_embedding": "none"})
    model = TransformerLM(cfg)
    assert forward(model, init_jit(model), ids(0, 1, 3)).shape == (1, 3, 45)


def test_missing_or_bad_max_len_and_cache_errors():
    cfg = CONFIGS["rope_mha"]
    with pytest.raises(ValueError, match="`max_len`"):
        init_cache(cfg, 2)
    with pytest.raises(ValueError, match="`max_len`.*positive int.*got None"):
        init_kv_cache(cfg, 2, None)
    with pytest.raises(ValueError, match="`max_len`.*got 0"):
        init_kv_cache(cfg, 2, 0)
    cache = init_kv_cache(cfg, 2, 6)
    assert isinstance(cache, KVCache) and cache.key.shape == (2, 6, 4, 8) and cache.index.shape == ()
    model = TransformerLM(cfg)
    params = init_jit(model)
    with pytest.raises(ValueError, match="chunk of 9 tokens does not fit a KV cache of max_len=6"):
        model.apply({"params": params}, ids(0, 2, 9), cache=init_cache(cfg, 2, 6), method="forward")
    with pytest.raises(ValueError, match=r"`cache.key` must have shape \(3, max_len, 4, 8\)"):
        model.apply({"params": params}, ids(0, 3, 2), cache=init_cache(cfg, 2, 6)._replace(
            positions=jnp.zeros((3,), jnp.int32)), method="forward")
    bad = init_cache(cfg, 2, 6)
    bad = bad._replace(layers=(bad.layers[0][:2] + bad.layers[0][3:],) + bad.layers[1:])
    with pytest.raises(ValueError, match="`cache` must be a KVCache"):
        model.apply({"params": params}, ids(0, 2, 2), cache=bad, method="forward")


def test_mlp_width_scales_with_d_model_as_llama_unless_set():
    # Llama: int(2/3 · 4 · d) rounded up to a multiple of 256 (LLaMA-7B: d 4096 -> 11008)
    for d, want in ((64, 256), (96, 256), (128, 512), (768, 2048), (4096, 11008)):
        assert TransformerConfig(d_model=d, n_heads=4).mlp_width == want, d
    assert TransformerConfig(d_model=768, d_intermediate=100).mlp_width == 100
    assert TransformerConfig(d_model=768, d_intermediate=0).mlp_width == 0
    params = init_params(TransformerLM(TransformerConfig(vocab_size=8, d_model=128, n_layer=1, n_heads=4)),
                         jax.random.PRNGKey(0))
    assert params["layers_0"]["mlp"]["up_proj"]["kernel"].shape == (128, 512)
    # in a hybrid, the attention layers' MLP follows the hybrid's width (the sub-config leaves it None)
    from mamba_jax.models import HybridConfig
    hybrid = HybridConfig(pattern="M A", d_model=768, attention=TransformerConfig(n_heads=8))
    assert hybrid.mixer_config("A").mlp_width == 2048
