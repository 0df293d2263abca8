"""Recurrent inference: step == forward, chunked prefill, left padding, sampling, generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference import filter_logits, generate, init_cache, prefill, sample_logits, step
from mamba_jax.models import MambaConfig, MambaLM, init_params

CONFIGS = {
    "default": MambaConfig(vocab_size=40, d_model=32, n_layer=2, d_state=8),
    "odd": MambaConfig(vocab_size=37, d_model=24, n_layer=3, d_state=5, d_conv=2, dt_rank=5, bias=True,
                       conv_bias=False, scan_impl="chunked", chunk_size=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_params(request):
    model = MambaLM(CONFIGS[request.param])
    return model, init_params(model, jax.random.PRNGKey(0))


def ids(seed, b, l, vocab):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, vocab)


def test_step_by_step_equals_parallel_forward(model_and_params):
    model, params = model_and_params
    x = ids(1, 3, 14, model.config.vocab_size)
    full = model.apply({"params": params}, x)
    cache = init_cache(model.config, 3)
    logits = []
    for t in range(14):
        lg, cache = step(model, params, x[:, t], cache)
        logits.append(lg)
    np.testing.assert_allclose(jnp.stack(logits, 1), full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_full_prefill(model_and_params):
    model, params = model_and_params
    x = ids(2, 2, 19, model.config.vocab_size)
    full_logits, full_cache = prefill(model, params, x)
    l1, c1 = prefill(model, params, x[:, :6])
    l2, c2 = prefill(model, params, x[:, 6:], c1)
    np.testing.assert_allclose(jnp.concatenate([l1, l2], 1), full_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(c2), jax.tree_util.tree_leaves(full_cache)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the cache then decodes like the parallel forward of the longer sequence
    nxt = ids(3, 2, 1, model.config.vocab_size)
    step_logits, _ = step(model, params, nxt[:, 0], c2)
    np.testing.assert_allclose(step_logits, model.apply({"params": params}, jnp.concatenate([x, nxt], 1))[:, -1],
                               rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_each_sequence_alone(model_and_params):
    model, params = model_and_params
    vocab = model.config.vocab_size
    prompts = [ids(10 + i, 1, length, vocab)[0] for i, length in enumerate([9, 3, 6])]
    width = max(len(p) for p in prompts)
    pad_id = 0
    batch = jnp.stack([jnp.concatenate([jnp.full(width - len(p), pad_id), p]) for p in prompts])
    mask = jnp.stack([jnp.arange(width) >= width - len(p) for p in prompts]).astype(jnp.int32)
    batch_logits, _ = prefill(model, params, batch, None, mask)
    batch_tokens = generate(model, params, batch, 12, temperature=0.0, prompt_mask=mask)
    for i, p in enumerate(prompts):
        alone_logits, _ = prefill(model, params, p[None])
        np.testing.assert_allclose(batch_logits[i, width - len(p):], alone_logits[0], rtol=1e-5, atol=1e-5)
        alone_tokens = generate(model, params, p[None], 12, temperature=0.0)
        np.testing.assert_array_equal(batch_tokens[i], alone_tokens[0])


def test_greedy_generation_is_argmax_of_the_forward(model_and_params):
    """Greedy tokens re-derived independently with a full parallel forward, and deterministic: the model
    is causal (tested with the models), so one forward over prompt + generated tokens gives at position
    5 + t - 1 the logits a forward of the first 5 + t tokens ends with; token t must be their argmax."""
    model, params = model_and_params
    prompt = ids(4, 2, 5, model.config.vocab_size)
    tokens = generate(model, params, prompt, 6, temperature=0.0)
    assert tokens.shape == (2, 6) and tokens.dtype == jnp.int32
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.concatenate([prompt, tokens], 1))
    np.testing.assert_array_equal(tokens, jnp.argmax(logits[:, 4:10], -1))
    np.testing.assert_array_equal(generate(model, params, prompt, 6, temperature=0.0), tokens)


def test_generation_compiles_once_per_shape():
    model = MambaLM(CONFIGS["default"])
    params = init_params(model, jax.random.PRNGKey(0))
    from mamba_jax import inference
    prompt = ids(5, 2, 5, 40)
    generate(model, params, prompt, 4, temperature=0.0)
    before = inference._generate._cache_size()
    generate(model, params, prompt + 1, 4, temperature=0.0)
    assert inference._generate._cache_size() == before


def test_eos_stops_a_row():
    model = MambaLM(CONFIGS["default"])
    params = init_params(model, jax.random.PRNGKey(0))
    prompt = ids(6, 2, 5, 40)
    greedy = generate(model, params, prompt, 8, temperature=0.0)
    eos = int(greedy[0, 2])
    tokens = np.asarray(generate(model, params, prompt, 8, temperature=0.0, eos_id=eos))
    for row in range(2):
        hits = np.flatnonzero(np.asarray(greedy[row]) == eos)
        if hits.size:
            first = hits[0]
            np.testing.assert_array_equal(tokens[row, :first + 1], greedy[row, :first + 1])
            assert (tokens[row, first:] == eos).all()
        else:
            np.testing.assert_array_equal(tokens[row], greedy[row])


def test_sampling_filters_match_numpy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 30)), jnp.float32)
    kept_k = np.asarray(filter_logits(logits, top_k=5)) > -1e30
    np.testing.assert_array_equal(kept_k.sum(-1), 5)
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    assert all(set(np.flatnonzero(kept_k[i])) == set(top5[i]) for i in range(4))
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    kept_p = np.asarray(filter_logits(logits, top_p=0.6)) > -1e30
    for i in range(4):
        order = np.argsort(-p[i])
        n_keep = np.searchsorted(np.cumsum(p[i][order]), 0.6) + 1  # smallest set with mass >= 0.6
        assert set(np.flatnonzero(kept_p[i])) == set(order[:n_keep])


def test_sampling_distribution_and_top_k_1_is_greedy():
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.7]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.03)  # ~4.5 binomial std devs
    assert int(sample_logits(logits, keys[0], 1.0, top_k=1)[0]) == 2


def test_bad_generate_arguments():
    model = MambaLM(CONFIGS["default"])
    params = init_params(model, jax.random.PRNGKey(0))
    prompt = ids(7, 1, 3, 40)
    with pytest.raises(ValueError, match="`rng`"):
        generate(model, params, prompt, 2, temperature=1.0)
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive int"):
        generate(model, params, prompt, 0, temperature=0.0)
    with pytest.raises(ValueError, match="`top_p` must be None or in"):
        generate(model, params, prompt, 2, temperature=1.0, top_p=1.5, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"`prompt_mask` must have shape \(1, 3\)"):
        generate(model, params, prompt, 2, temperature=0.0, prompt_mask=jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="`prompt_ids` must be an integer array"):
        generate(model, params, prompt.astype(jnp.float32), 2, temperature=0.0)
