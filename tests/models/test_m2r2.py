"""M2R2's fast stream: the rate-scaled update, adapter-only parameters and training, and lossless
self-speculative decoding with the fast stream as the draft."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.inference import generate, speculative_generate
from mamba_jax.layers.attention import KVCache
from mamba_jax.models.lm import ModelCache, init_cache
from mamba_jax.models.m2r2 import (adapter_params, fast_stream, fast_stream_params, m2r2_loss, make_m2r2_train_step,
                                   truncated_config)
from tests.invariants.families import D_MODEL, model_and_params, tokens


@pytest.mark.parametrize("name", ["A[rope,gqa]", "M A M2 E"])
def test_fast_stream_scales_each_layer_update_by_its_rate(name):
    """Independent check through the base's own hidden states: with fresh adapters (zero `up`), the fast
    stream's first update is r times the base's first layer update: g_1 = h_0 + r (h_1 − h_0)."""
    base, params = model_and_params(name)
    fast = fast_stream(base, 1, rank=4, rate=2.5)
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(1))
    x = tokens(5, 2, 9)
    hidden = lambda model, p: jax.jit(lambda p, x: model.apply(   # noqa: E731
        {"params": p}, x, return_hidden_states=True, method="forward").hidden_states)(p, x)
    slow, g = hidden(base, params), hidden(fast, fp)
    np.testing.assert_allclose(g[1], slow[0] + 2.5 * (slow[1] - slow[0]), rtol=1e-5, atol=1e-5)
    assert fast.config.layer_kinds == base.config.layer_kinds[:1]


def test_adapter_only_parameters_and_truncation():
    base, params = model_and_params("M A M2 E")
    fast = fast_stream(base, 3, rank=4)
    assert fast.residual_rate == pytest.approx(4 / 3) and fast.config.layer_kinds == ("M", "A", "M2")
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(0))
    adapters = adapter_params(fp)
    assert sorted(adapters) == ["adapters_0", "adapters_1", "adapters_2"]
    # per layer: RMSNorm weight d, down d × r, up r × d
    assert sum(np.size(a) for a in jax.tree_util.tree_leaves(adapters)) == 3 * (D_MODEL + 2 * D_MODEL * 4)
    for k in fp:
        if not k.startswith("adapters_"):
            assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(fp[k]), jax.tree_util.tree_leaves(params[k])))
    with pytest.raises(ValueError, match="`n_layers` must be an int in"):
        truncated_config(base.config, 5)
    with pytest.raises(ValueError, match="`residual_rate` must be a number > 0"):
        type(base)(base.config, residual_rate=0.0)


def test_training_moves_only_the_adapters_and_lowers_the_loss():
    base, params = model_and_params("A[rope,gqa]")
    fast = fast_stream(base, 1, rank=8)
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(0))
    adapters = adapter_params(fp)
    frozen = {k: v for k, v in fp.items() if k not in adapters}
    before = jax.tree_util.tree_map(np.array, (params, frozen))
    tx = optax.adam(3e-2)
    step = make_m2r2_train_step(fast, base, tx)
    x, mask = tokens(6, 4, 16), jnp.ones((4, 16))
    opt_state = tx.init(adapters)
    first = None
    for _ in range(30):
        adapters, opt_state, metrics = step(adapters, opt_state, frozen, params, x, mask)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.9 * first
    for a, b in zip(jax.tree_util.tree_leaves((params, frozen)), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)                         # frozen base: bitwise unchanged
    assert float(jnp.abs(adapters["adapters_0"]["up"]["kernel"]).max()) > 0
    # the loss by hand for one token: align = 1 - cos of RMS-normalised residuals; kl = KL(full || fast)
    loss, m = m2r2_loss(fast, {**frozen, **adapters}, base, params, x[:1, :1])
    slow = base.apply({"params": params}, x[:1, :1], return_hidden_states=True, method="forward")
    out = fast.apply({"params": {**frozen, **adapters}}, x[:1, :1], return_hidden_states=True, method="forward")
    g, h = np.asarray(out.hidden_states[1][0, 0], np.float64), np.asarray(slow.hidden_states[2][0, 0], np.float64)
    p = np.exp(np.asarray(slow.logits[0, 0], np.float64))
    p /= p.sum()
    q = np.exp(np.asarray(out.logits[0, 0], np.float64))
    q /= q.sum()
    np.testing.assert_allclose(m["align"], 1 - g @ h / np.linalg.norm(g) / np.linalg.norm(h), atol=1e-4)
    np.testing.assert_allclose(m["kl"], np.sum(p * np.log(p / q)), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name,n_fast", [("A[rope,gqa]", 1), ("M A M2 E", 2), ("M[reference]", 1),
                                         ("M2[reference]", 1)])
def test_self_speculative_greedy_equals_the_base_model(name, n_fast):
    base, params = model_and_params(name)
    fast = fast_stream(base, n_fast, rank=4)
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(2))
    fp = {**fp, **jax.tree_util.tree_map(lambda a: a + 0.1, adapter_params(fp))}   # non-zero adapters
    prompt = tokens(7, 2, 6)
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
    out, stats = speculative_generate(base, params, fast, fp, prompt, 10, num_draft=3, prompt_mask=mask)
    np.testing.assert_array_equal(out, generate(base, params, prompt, 10, temperature=0.0, prompt_mask=mask))
    assert stats.target_calls <= 10


def _nonzero_fast_stream(base, params, n_fast, rate=None):
    fast = fast_stream(base, n_fast, rank=4, rate=rate)
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(2))
    return fast, {**fp, **jax.tree_util.tree_map(lambda a: a + 0.1, adapter_params(fp))}


@pytest.mark.parametrize("name,n_fast", [("A[rope,gqa]", 2), ("A[learned]", 2), ("M A M2 E", 3)])
def test_shared_kv_forward_equals_decoding_over_the_slow_streams_cache(name, n_fast):
    """The parallel shared-KV forward (`shared_kv_states`) at position t equals a decode step of the fast
    stream over the KV caches the base wrote for tokens < t (its recurrent layers carrying their own state
    step to step). The fast stream with its own keys differs (the check can fail)."""
    base, params = model_and_params(name)
    fast, fp = _nonzero_fast_stream(base, params, n_fast, rate=1.5)
    x = tokens(3, 2, 9)
    fwd = jax.jit(lambda model, p, ids, mask=None, shared=None: model.apply(
        {"params": p}, ids, mask=mask, shared_kv_states=shared, return_hidden_states=True, method="forward"),
        static_argnums=0)
    step = jax.jit(lambda model, p, ids, cache: model.apply({"params": p}, ids, cache=cache, method="forward"),
                   static_argnums=0)
    slow = fwd(base, params, x)
    shared = fwd(fast, fp, x, shared=slow.hidden_states).logits
    own = fwd(fast, fp, x).logits
    base_cache, fast_cache, steps = init_cache(base.config, 2, 9), init_cache(fast.config, 2, 9), []
    for t in range(9):
        fast_cache = ModelCache(tuple(s if isinstance(s, KVCache) else f for s, f in
                                      zip(base_cache.layers, fast_cache.layers)), base_cache.positions)
        out = step(fast, fp, x[:, t:t + 1], fast_cache)
        steps.append(out.logits[:, 0])
        fast_cache = out.cache
        base_cache = step(base, params, x[:, t:t + 1], base_cache).cache
    steps = jnp.stack(steps, 1)
    np.testing.assert_allclose(shared, steps, rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(own - steps))) > 0.1
    # left padding: a padded row gives what the row gives alone
    mask = jnp.array([[0, 0, 0] + [1] * 6], jnp.int32)
    row = jnp.concatenate([tokens(5, 1, 3), x[:1, 3:]], 1)
    pad, alone = fwd(base, params, row, mask), fwd(base, params, x[:1, 3:])
    np.testing.assert_allclose(fwd(fast, fp, row, mask, pad.hidden_states).logits[:, 3:],
                               fwd(fast, fp, x[:1, 3:], None, alone.hidden_states).logits, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["A[rope,gqa]", "A[learned]"])
def test_self_speculative_over_the_shared_kv_cache_equals_the_base(name):
    base, params = model_and_params(name)
    fast, fp = _nonzero_fast_stream(base, params, 2, rate=1.5)
    prompt = tokens(7, 2, 6)
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
    out, stats = speculative_generate(base, params, fast, fp, prompt, 10, num_draft=3, prompt_mask=mask,
                                      share_kv=True)
    np.testing.assert_array_equal(out, generate(base, params, prompt, 10, temperature=0.0, prompt_mask=mask))
    assert stats.target_calls <= 10 and 0 < stats.acceptance_rate


def test_shared_kv_errors_name_what_cannot_be_shared():
    base, params = model_and_params("M A M2 E")
    fast, fp = _nonzero_fast_stream(base, params, 2)
    prompt = tokens(7, 2, 6)
    with pytest.raises(ValueError, match="recurrent layers"):
        speculative_generate(base, params, fast, fp, prompt, 4, share_kv=True)
    other, op = model_and_params("A[learned]")
    t, tp = model_and_params("A[rope,gqa]")
    with pytest.raises(ValueError, match=r"KV cache \(kv_heads, head_dim, dtype\)"):
        speculative_generate(t, tp, other, op, prompt, 4, share_kv=True)
    mamba, mp = model_and_params("M[reference]")
    with pytest.raises(ValueError, match="first layers"):
        speculative_generate(t, tp, mamba, mp, prompt, 4, share_kv=True)
    x = tokens(1, 2, 5)
    with pytest.raises(ValueError, match="`shared_kv_states` must be a sequence of at least n_layer=2"):
        t.apply({"params": tp}, x, shared_kv_states=(jnp.zeros((2, 5, D_MODEL)),))
    with pytest.raises(ValueError, match="uncached form"):
        t.apply({"params": tp}, x, cache=init_cache(t.config, 2, 8), shared_kv_states=(jnp.zeros((2, 5, D_MODEL)),) * 2,
                method="forward")


def test_early_exit_by_hand():
    from mamba_jax.models.m2r2 import early_exit_point, early_exit_quality, residual_distances

    scores = jnp.array([[[0.9, 0.1, 0.5]], [[0.2, 0.8, 0.4]]])           # (K=2 exits, b=1, l=3)
    first, layers = early_exit_point(scores, 0.6, exit_layers=(1, 2), full_layers=4)
    np.testing.assert_array_equal(first, [[0, 1, 2]])
    np.testing.assert_array_equal(layers, [[1.0, 2.0, 4.0]])
    # token 0 exits at exit 0 (argmax 1), token 1 at exit 1 (argmax 0), token 2 runs the full model (argmax 2)
    eye = jnp.eye(3) * 5.0
    exits = jnp.stack([jnp.stack([eye[1], eye[2], eye[2]])[None], jnp.stack([eye[0], eye[0], eye[0]])[None]])
    full = jnp.stack([eye[1], eye[1], eye[2]])[None]
    agree, nll = early_exit_quality(exits, full, jnp.array([[1, 0, 0]]), first)
    assert agree == pytest.approx(2 / 3)
    log_p = np.log(np.exp(5.0) / (np.exp(5.0) + 2))                      # the right class of a 5-vs-0 logit
    log_q = np.log(1 / (np.exp(5.0) + 2))
    assert nll == pytest.approx(-(log_p + log_p + log_q) / 3, rel=1e-5)
    h = [jnp.array([[[1.0, 0.0]]]), jnp.array([[[1.0, 1.0]]]), jnp.array([[[2.0, 2.0]]])]
    np.testing.assert_allclose(residual_distances(h)[:, 0, 0], [1 - 1 / np.sqrt(2), 0.0], atol=1e-6)


def test_exit_logits_end_at_the_models_own_logits():
    from mamba_jax.models.m2r2 import exit_logits

    base, params = model_and_params("M A M2 E")
    x = tokens(8, 2, 7)
    np.testing.assert_allclose(exit_logits(base, params, x, 4)[-1], base.apply({"params": params}, x),
                               rtol=1e-5, atol=1e-5)
    fast = fast_stream(base, 2, rank=4)
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(3))
    fp = {**fp, **jax.tree_util.tree_map(lambda a: a + 0.1, adapter_params(fp))}
    both = exit_logits(fast, fp, x, 2)
    np.testing.assert_allclose(both[-1], fast.apply({"params": fp}, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(both[0], both[1])


def test_skip_decoding_schedule_by_hand_and_layer_mask():
    from mamba_jax.models.m2r2 import exit_logits, skip_decoding_layer_mask

    run, mean = skip_decoding_layer_mask(3, 4, max_layers=4, min_layers=2, warmup_layers=1)
    # L(t) = 4, 3, 2: the warm-up layer 0, then the top L(t) − 1 layers
    np.testing.assert_array_equal(run, [[1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 0, 1]])
    assert mean == pytest.approx(3.0)
    with pytest.raises(ValueError, match="min_layers"):
        skip_decoding_layer_mask(3, 4, max_layers=2, min_layers=3)

    base, params = model_and_params("A[rope,gqa]")
    n = base.config.n_layer
    x = tokens(9, 2, 7)
    fwd = lambda lm: base.apply({"params": params}, x, layer_mask=lm, method="forward").logits   # noqa: E731
    np.testing.assert_allclose(fwd(jnp.ones((2, 7, n), bool)), base.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    # every token skipping the last layer is the model cut before it (an independent path: a truncated model)
    skip_last = jnp.ones((2, 7, n), bool).at[..., n - 1].set(False)
    np.testing.assert_allclose(fwd(skip_last), exit_logits(base, params, x, n - 1)[-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer_mask"):
        fwd(jnp.ones((2, 7, n + 1), bool))


def test_expert_prediction_against_a_hand_made_router():
    """Layer 3 of "M A M2 E" routes by the sign of its normalised residual's first channel (a hand-made
    router: expert 0 when positive, 1 when negative); the hit rate of predicting it from the residual after
    i layers is then the share of tokens whose h_i[0] · scale[0] has the sign of h_3[0] · scale[0]."""
    from mamba_jax.models.m2r2 import expert_hit_rate, expert_prediction_hit_rates, route_top_k

    # route_top_k and expert_hit_rate by hand
    kernel = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    top = route_top_k(jnp.array([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.1]]), jnp.ones(2), kernel, 1)
    np.testing.assert_array_equal(top[:, 0], [0, 1, 2])
    assert expert_hit_rate(jnp.array([[0], [1]]), jnp.array([[0], [2]])) == pytest.approx(0.5)
    assert expert_hit_rate(jnp.array([[0, 1], [1, 2]]), jnp.array([[1, 0], [0, 3]])) == pytest.approx(0.5)
    assert expert_hit_rate(jnp.array([[0], [1]]), jnp.array([[0], [2]]), mask=jnp.array([1, 0])) == 1.0

    base, params = model_and_params("M A M2 E")
    assert base.config.layer_kinds[3] == "E"
    router = params["layers_3"]["mixer"]["moe"]["router"]["kernel"]
    hand = jnp.zeros_like(router).at[0, 0].set(1.0).at[0, 1].set(-1.0)
    params = {**params, "layers_3": {**params["layers_3"], "mixer": {**params["layers_3"]["mixer"], "moe": {
        **params["layers_3"]["mixer"]["moe"], "router": {"kernel": hand}}}}}
    fast = fast_stream(base, 2, rank=4)
    fp = fast_stream_params(fast, params, jax.random.PRNGKey(5))
    fp = {**fp, **jax.tree_util.tree_map(lambda a: a + 0.05, adapter_params(fp))}
    x = tokens(11, 3, 9)
    rates = expert_prediction_hit_rates(base, params, fast, fp, x, k=1)
    sign = float(np.sign(params["layers_3"]["norm"]["weight"][0]))
    hs = lambda m, p: m.apply({"params": p}, x, return_hidden_states=True, method="forward").hidden_states  # noqa
    slow, g = hs(base, params), hs(fast, fp)
    chosen = lambda h: np.asarray(h[..., 0]) * sign > 0                   # noqa: E731  (expert 0)
    for i in range(3):
        assert rates["slow"][3 - i] == pytest.approx(np.mean(chosen(slow[i]) == chosen(slow[3])), abs=1e-6)
    for i in (1, 2):
        assert rates["fast"][3 - i] == pytest.approx(np.mean(chosen(g[i]) == chosen(slow[3])), abs=1e-6)
    assert set(rates["fast"]) == {1, 2}
    assert 0 < rates["slow"][3] < 1          # neither trivially all nor nothing


def test_offload_cost_model_by_hand():
    from mamba_jax.models.m2r2 import offload_decode_latency

    common = dict(n_layers=4, n_moe_layers=2, layer_s=1.0, experts_needed=2, expert_bytes=1.0, host_bandwidth=1.0)
    assert offload_decode_latency(**common) == 8.0                                   # 4 + 2 · T (T = 2)
    assert offload_decode_latency(**common, hit_rate=1.0, prefetch_distance=1) == 6.0   # 4 + 2 · (2 − 1)
    assert offload_decode_latency(**common, hit_rate=1.0, prefetch_distance=2) == 4.0   # hidden; link 2·T = 4
    assert offload_decode_latency(**common, hit_rate=0.5, prefetch_distance=3) == 6.0   # 4 + 2 · 1; link 6
    assert offload_decode_latency(**common, hit_rate=0.0, prefetch_distance=3) == 8.0   # link-bound: 2 · 2 · T
