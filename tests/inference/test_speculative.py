"""Speculative decoding: greedy output == greedy `generate`, the sampling rule is lossless (exact
enumeration and Monte Carlo against the target alone), rollback of every cache kind, and that each check
can fail (a planted rollback bug, a planted residual)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference import generate, init_cache, rollback_cache, speculative_generate
from mamba_jax.inference import speculative as spec
from mamba_jax.models import MambaConfig, MambaLM, TransformerConfig, TransformerLM, init_params
from tests.invariants.families import model_and_params, tokens, trained_scale

PROMPT = tokens(0, 3, 7)
MASK = jnp.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]], jnp.int32)   # a 1-token prompt too

# (target, draft): every family is a target and a draft at least once, the hybrid has every cache kind
PAIRS = [("M[reference]", "A[rope,gqa]"), ("A[rope,gqa]", "M2[reference]"), ("M2[reference]", "M[chunked]"),
         ("M A M2 E", "M2[reference]"), ("A[learned]", "M A M2 E")]


@pytest.mark.parametrize("target,draft", PAIRS)
def test_greedy_speculative_equals_greedy_generate(target, draft):
    (tm, tp), (dm, dp) = model_and_params(target), model_and_params(draft)
    expected = generate(tm, tp, PROMPT, 13, temperature=0.0, prompt_mask=MASK)
    out, stats = speculative_generate(tm, tp, dm, dp, PROMPT, 13, num_draft=3, prompt_mask=MASK)
    np.testing.assert_array_equal(out, expected)
    assert 0 <= stats.acceptance_rate <= 1 and 1 <= stats.mean_accepted_length <= 4
    assert stats.target_calls <= 13 and stats.draft_calls == 4 * stats.target_calls


def test_greedy_speculative_with_eos_equals_generate():
    (tm, tp), (dm, dp) = model_and_params("M A M2 E"), model_and_params("M[reference]")
    plain = np.asarray(generate(tm, tp, PROMPT, 12, temperature=0.0, prompt_mask=MASK))
    eos = int(plain[1, 4])   # row 1 stops at its fifth token (others may stop too, or never)
    expected = generate(tm, tp, PROMPT, 12, temperature=0.0, prompt_mask=MASK, eos_id=eos)
    out, _ = speculative_generate(tm, tp, dm, dp, PROMPT, 12, num_draft=4, prompt_mask=MASK, eos_id=eos)
    np.testing.assert_array_equal(out, expected)
    assert (np.asarray(out)[1, 4:] == eos).all()


@pytest.mark.parametrize("name", ["M A M2 E", "A[learned]"])
def test_a_draft_equal_to_the_target_accepts_everything(name):
    model, params = model_and_params(name)
    out, stats = speculative_generate(model, params, model, params, PROMPT, 12, num_draft=3, prompt_mask=MASK)
    np.testing.assert_array_equal(out, generate(model, params, PROMPT, 12, temperature=0.0, prompt_mask=MASK))
    assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length == 4.0 and stats.target_calls == 3
    # sampling: p == q, so min(1, p/q) = 1 for every token
    _, stats = speculative_generate(model, params, model, params, PROMPT, 12, num_draft=3, prompt_mask=MASK,
                                    temperature=1.0, top_k=20, rng=jax.random.PRNGKey(1))
    assert stats.acceptance_rate == 1.0 and stats.target_calls == 3


def test_rollback_keeps_each_rows_prefix_for_every_cache_kind():
    """A chunk verified with `step_caches=True`, rolled back to a different prefix per row, then continued,
    gives the logits of a forward over exactly the kept tokens (hybrid: Mamba, attention, Mamba-2, MoE)."""
    model, params = model_and_params("M A M2 E")
    prefix, chunk, nxt = tokens(1, 3, 6), tokens(2, 3, 5), tokens(3, 3, 1)
    apply = jax.jit(lambda x, cache, step_caches=False: model.apply(
        {"params": params}, x, cache=cache, method="forward", step_caches=step_caches), static_argnums=2)
    before = apply(prefix, init_cache(model.config, 3, 20)).cache
    after = apply(chunk, before, True).cache
    n_keep = jnp.array([1, 3, 5])
    logits = apply(nxt, rollback_cache(before, after, n_keep)).logits[:, 0]
    forward = jax.jit(lambda x: model.apply({"params": params}, x))
    for row, n in enumerate([1, 3, 5]):
        seq = jnp.concatenate([prefix[row], chunk[row, :n], nxt[row]])[None]
        np.testing.assert_allclose(logits[row], forward(seq)[0, -1], rtol=2e-4, atol=2e-4)


def test_a_planted_rollback_bug_is_caught(monkeypatch):
    """Keeping the state one position too far (the first rejected token) must change the tokens."""
    (tm, tp), (dm, dp) = model_and_params("M2[reference]"), model_and_params("A[rope,gqa]")
    expected = generate(tm, tp, PROMPT, 11, temperature=0.0, prompt_mask=MASK)
    right = spec.rollback_cache
    monkeypatch.setattr(spec, "rollback_cache", lambda before, after, n_keep: right(
        before, after, jnp.minimum(n_keep + 1, 4)))
    out, stats = speculative_generate(tm, tp, dm, dp, PROMPT, 11, num_draft=3, prompt_mask=MASK)
    assert stats.acceptance_rate < 1
    assert not np.array_equal(out, expected)


# ---- the sampling rule -----------------------------------------------------------------------------------

V, K, H = 3, 2, 3   # vocabulary, draft tokens per round, horizon


def _tables(seed):
    """Conditional distributions of a toy 'model' that looks at the last two tokens: (V, V, V) + start."""
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.ones(V) * 0.7, size=(V + 1, V + 1))
    return lambda ctx: table[(ctx[-2] if len(ctx) > 1 else V), (ctx[-1] if ctx else V)]


def _speculative_distribution(p, q, residual, horizon):
    """P(first `horizon` tokens) under rounds of: draft K tokens from q, keep each with
    `acceptance_probability` while all before were kept, then draw from `residual` at the first rejection
    or from p after K kept — enumerated exactly (every draft, accept/reject outcome and next token)."""
    acc = lambda pt, qt: float(spec.acceptance_probability(jnp.float64(pt), jnp.float64(qt)))
    out = {}

    def rounds(ctx, prob):
        if len(ctx) >= horizon:
            out[ctx[:horizon]] = out.get(ctx[:horizon], 0.0) + prob
            return
        for drafts in itertools.product(range(V), repeat=K):
            q_seq, c = 1.0, ctx
            for d in drafts:
                q_seq *= q(c)[d]
                c = c + (d,)
            if q_seq == 0:
                continue
            keep_prob = 1.0
            for i in range(K + 1):   # i drafts kept, then the next token
                c = ctx + drafts[:i]
                if i == K:
                    dist = p(c)
                else:
                    reject = 1 - acc(p(c)[drafts[i]], q(c)[drafts[i]])
                    dist = np.asarray(residual(jnp.asarray(p(c)), jnp.asarray(q(c))), np.float64)
                for v in range(V):
                    weight = prob * q_seq * keep_prob * (1 if i == K else reject) * dist[v]
                    if weight > 0:
                        rounds(c + (v,), weight)
                if i < K:
                    keep_prob *= 1 - reject

    rounds((), 1.0)
    return out


def _target_distribution(p, horizon):
    return {s: float(np.prod([p(s[:t])[s[t]] for t in range(horizon)]))
            for s in itertools.product(range(V), repeat=horizon)}


def test_the_sampling_rule_is_lossless_by_exact_enumeration():
    with jax.enable_x64(True):
        p, q = _tables(0), _tables(1)
        exact = _target_distribution(p, H)
        got = _speculative_distribution(p, q, spec.residual_distribution, H)
        assert set(got) <= set(exact)
        np.testing.assert_allclose([got.get(s, 0.0) for s in exact], list(exact.values()), atol=1e-12)
        # can fail: drawing from p after a rejection (not the residual) is biased toward the draft
        wrong = _speculative_distribution(p, q, lambda p_, q_: p_, H)
        assert max(abs(wrong.get(s, 0.0) - exact[s]) for s in exact) > 0.01


def test_sampling_verify_draws_n_and_next_token_with_the_exact_probabilities():
    """sampling_verify on 200k copies of one (p, q, drafts): the joint frequencies of (kept count, next
    token) match the closed form within 5 binomial standard deviations."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(V), size=K + 1)
    q = rng.dirichlet(np.ones(V), size=K)
    drafts = np.array([int(np.argmax(q[0])), int(np.argmax(q[1]))])
    n_rows = 200_000
    tile = lambda a: jnp.asarray(np.broadcast_to(a, (n_rows,) + a.shape), jnp.float32)
    n, nxt = spec.sampling_verify(tile(p), tile(q), jnp.asarray(np.broadcast_to(drafts, (n_rows, K))),
                                  jax.random.PRNGKey(0))
    freq = np.zeros((K + 1, V))
    np.add.at(freq, (np.asarray(n), np.asarray(nxt)), 1.0 / n_rows)
    keep = [min(1, p[i, drafts[i]] / q[i, drafts[i]]) for i in range(K)]
    exact = np.zeros((K + 1, V))
    for i in range(K + 1):
        reach = np.prod(keep[:i])
        if i == K:
            exact[i] = reach * p[K]
        else:
            r = np.maximum(p[i] - q[i], 0)
            exact[i] = reach * (1 - keep[i]) * r / r.sum()
    np.testing.assert_allclose(freq, exact, atol=5 * np.sqrt(0.25 / n_rows))


def test_speculative_sampling_matches_the_targets_distribution():
    """End to end on tiny models (vocabulary 4): the first 3 sampled tokens of 6,000 rows follow the target's
    exact sequence distribution (64 sequences, enumerated with the parallel forward): chi-square p > 1e-4."""
    target = MambaLM(MambaConfig(vocab_size=4, d_model=8, n_layer=1, d_state=4))
    draft = TransformerLM(TransformerConfig(vocab_size=4, d_model=8, n_layer=1, n_heads=2, d_intermediate=16))
    tp = trained_scale(init_params(target, jax.random.PRNGKey(0)), seed=1)
    dp = trained_scale(init_params(draft, jax.random.PRNGKey(1)), seed=2)
    prompt = jnp.array([[1, 3]], jnp.int32)
    n_rows = 6000
    out, stats = speculative_generate(target, tp, draft, dp, jnp.repeat(prompt, n_rows, 0), 3, num_draft=2,
                                      temperature=1.0, rng=jax.random.PRNGKey(7))
    assert 0.05 < stats.acceptance_rate < 0.95   # both branches of the rule are exercised
    seqs = np.array(list(itertools.product(range(4), repeat=3)))
    logp = jax.nn.log_softmax(target.apply({"params": tp}, jnp.concatenate(
        [jnp.repeat(prompt, len(seqs), 0), jnp.asarray(seqs)], 1)), -1)
    exact = np.exp(np.sum(np.take_along_axis(np.asarray(logp[:, 1:4], np.float64), seqs[..., None], -1)[..., 0], 1))
    np.testing.assert_allclose(exact.sum(), 1.0, atol=1e-5)
    counts = np.zeros(len(seqs))
    np.add.at(counts, np.asarray(out) @ np.array([16, 4, 1]), 1)
    from scipy.stats import chisquare
    assert chisquare(counts, exact / exact.sum() * n_rows).pvalue > 1e-4


def test_bad_speculative_arguments():
    (tm, tp), (dm, dp) = model_and_params("M[reference]"), model_and_params("A[rope,gqa]")
    small = MambaLM(MambaConfig(vocab_size=10, d_model=8, n_layer=1, d_state=4))
    with pytest.raises(ValueError, match="draft's vocab_size"):
        speculative_generate(tm, tp, small, None, PROMPT, 4)
    with pytest.raises(ValueError, match="`num_draft`"):
        speculative_generate(tm, tp, dm, dp, PROMPT, 4, num_draft=0)
    with pytest.raises(ValueError, match="`rng`"):
        speculative_generate(tm, tp, dm, dp, PROMPT, 4, temperature=1.0)
    with pytest.raises(ValueError, match="`prompt_mask`"):
        speculative_generate(tm, tp, dm, dp, PROMPT, 4, prompt_mask=MASK[:, ::-1])
    with pytest.raises(ValueError, match="step_caches"):
        tm.apply({"params": tp}, PROMPT, step_caches=True, method="forward")


@pytest.mark.parametrize("share_kv", [False, True])
def test_self_speculative_sampling_matches_the_targets_distribution(share_kv):
    """The same end-to-end check with M2R2's fast stream as the draft (the target's first 2 of 3 layers at
    rate 1.5 with non-zero adapters, sharing the target's embeddings and head), with its own caches and
    drafting over the target's KV caches: lossless sampling, chi-square p > 1e-4."""
    from mamba_jax.models.m2r2 import adapter_params, fast_stream, fast_stream_params

    target = TransformerLM(TransformerConfig(vocab_size=4, d_model=8, n_layer=3, n_heads=2, d_intermediate=16))
    tp = trained_scale(init_params(target, jax.random.PRNGKey(0)), seed=3)
    draft = fast_stream(target, 2, rank=2)
    dp = fast_stream_params(draft, tp, jax.random.PRNGKey(1))
    dp = {**dp, **trained_scale(adapter_params(dp), seed=4)}
    prompt = jnp.array([[2, 1]], jnp.int32)
    n_rows = 6000
    out, stats = speculative_generate(target, tp, draft, dp, jnp.repeat(prompt, n_rows, 0), 3, num_draft=2,
                                      temperature=1.0, rng=jax.random.PRNGKey(8), share_kv=share_kv)
    assert 0.05 < stats.acceptance_rate < 0.95
    seqs = np.array(list(itertools.product(range(4), repeat=3)))
    logp = jax.nn.log_softmax(target.apply({"params": tp}, jnp.concatenate(
        [jnp.repeat(prompt, len(seqs), 0), jnp.asarray(seqs)], 1)), -1)
    exact = np.exp(np.sum(np.take_along_axis(np.asarray(logp[:, 1:4], np.float64), seqs[..., None], -1)[..., 0], 1))
    counts = np.zeros(len(seqs))
    np.add.at(counts, np.asarray(out) @ np.array([16, 4, 1]), 1)
    from scipy.stats import chisquare
    assert chisquare(counts, exact / exact.sum() * n_rows).pvalue > 1e-4
