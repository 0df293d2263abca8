"""GRPO: advantages and the clipped loss against hand computations, rollout log-probs against a
teacher-forced forward for every family, and a bandit where GRPO must raise the expected reward."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.inference import generate, generate_with_logprobs
from mamba_jax.models import TransformerConfig, TransformerLM, init_params
from mamba_jax.rl import GRPOConfig, completion_logprobs, group_advantages, grpo_iteration, grpo_loss, make_grpo_step
from mamba_jax.train import create_train_state
from tests.invariants.families import model_and_params


def test_group_advantages_by_hand():
    adv = np.asarray(group_advantages([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]]))
    # group 1: mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = 0.57735; group 3: mean 0.25, std sqrt(0.75 / 3) = 0.5
    s = math.sqrt(1 / 3)
    np.testing.assert_allclose(adv[0], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rtol=1e-5)
    np.testing.assert_array_equal(adv[1], 0.0)                  # all equal: nothing to learn
    np.testing.assert_allclose(adv[2], [-0.5, -0.5, -0.5, 1.5], rtol=1e-5)
    with pytest.raises(ValueError, match="samples per prompt >= 2"):
        group_advantages([[1.0], [0.0]])


# two rows of three tokens; the last token of row 2 is padding (log ratio 6 there: masked, never used)
LOGP = np.array([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]], np.float32)
OLD = np.array([[-1.0, -2.3, -0.2], [-1.2, -1.0, -9.0]], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
ADV = np.array([1.0, -2.0], np.float32)


def test_grpo_loss_by_hand():
    r = math.exp(0.3)       # ratio of row 1 token 2; row 1 token 3 and row 2 token 1 have 1 / r = 0.7408
    # row 1 (A = 1): max(-ratio, -clip(ratio, 0.8, 1.2)) = -1, -1.2 (clipped), -1/r (clip would give -0.8)
    # row 2 (A = -2): max(2 ratio, 2 clip) = 1.6 (clipped: 2/r = 1.48 < 1.6), 2
    row1, row2 = [-1.0, -1.2, -1 / r], [1.6, 2.0]
    loss, m = grpo_loss(LOGP, OLD, ADV, MASK)
    assert math.isclose(float(loss), (sum(row1) + sum(row2)) / 5, rel_tol=1e-6)
    assert math.isclose(float(m["clip_fraction"]), 2 / 5, rel_tol=1e-6)
    k3 = [0.0, r - 1 - 0.3, 1 / r - 1 + 0.3, 1 / r - 1 + 0.3, 0.0]      # (ratio − 1) − log ratio per token
    assert math.isclose(float(m["approx_kl"]), sum(k3) / 5, rel_tol=1e-5)
    seq, _ = grpo_loss(LOGP, OLD, ADV, MASK, aggregation="sequence_mean")
    assert math.isclose(float(seq), (sum(row1) / 3 + sum(row2) / 2) / 2, rel_tol=1e-6)
    # entropy bonus and KL to a reference, token mean
    ent = np.full((2, 3), 2.0, np.float32)
    ref = LOGP + 0.5
    loss2, m2 = grpo_loss(LOGP, OLD, ADV, MASK, entropy=ent, entropy_coef=0.1, ref_logp=ref, kl_coef=0.2)
    kl = math.exp(0.5) - 0.5 - 1
    assert math.isclose(float(m2["kl_ref"]), kl, rel_tol=1e-5)
    assert math.isclose(float(loss2), float(loss) - 0.1 * 2.0 + 0.2 * kl, rel_tol=1e-5)


def test_grpo_gradient_is_zero_exactly_where_the_clip_binds():
    # per token: A > 0 & ratio > 1 + eps -> clipped (0); A < 0 & ratio < 1 - eps -> clipped (0);
    # A > 0 & ratio < 1 - eps and A < 0 & ratio > 1 + eps -> the unclipped term, gradient -A · ratio / N
    logp = np.log(np.array([[1.5, 0.5], [0.5, 1.5]], np.float32))
    old = np.zeros((2, 2), np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    grad = np.asarray(jax.grad(lambda lp: grpo_loss(lp, old, adv, np.ones((2, 2)))[0])(logp))
    np.testing.assert_allclose(grad, [[0.0, -1.0 * 0.5 / 4], [0.0, 1.0 * 1.5 / 4]], rtol=1e-6)


def test_grpo_loss_ignores_nan_under_the_mask():
    logp = LOGP.copy()
    logp[1, 2] = np.nan
    loss, grad = jax.value_and_grad(lambda lp: grpo_loss(lp, OLD, ADV, MASK, aggregation="sequence_mean")[0])(logp)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all() and grad[1, 2] == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(LOGP, OLD, ADV, MASK, aggregation="mean")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(LOGP, OLD, ADV, MASK, kl_coef=0.1)


@pytest.mark.parametrize("family", ["A[rope,gqa]", "M[chunked]", "M[input-form]", "M A M2 E"])   # input form: M1's Mamba
def test_rollout_logprobs_equal_a_teacher_forced_forward(family):
    model, params = model_and_params(family)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 61, (3, 5)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], jnp.int32)
    first = generate_with_logprobs(model, params, prompt, 7, temperature=0.9, rng=jax.random.PRNGKey(1),
                                   prompt_mask=mask)
    eos = int(first.tokens[0, 2])          # a token row 0 samples at step 2 becomes EOS: it stops there
    gen = generate_with_logprobs(model, params, prompt, 7, temperature=0.9, rng=jax.random.PRNGKey(1),
                                 prompt_mask=mask, eos_id=eos)
    tokens, live = np.asarray(gen.tokens), np.asarray(gen.mask)
    for row in range(3):
        ends = np.flatnonzero(tokens[row] == eos)
        n = 7 if ends.size == 0 else ends[0] + 1
        assert live[row].tolist() == [True] * n + [False] * (7 - n)
        assert (tokens[row, n:] == eos).all() and (np.asarray(gen.logprobs)[row, n:] == 0).all()
    assert live[0].sum() <= 3
    np.testing.assert_array_equal(tokens, generate(model, params, prompt, 7, temperature=0.9,
                                                   rng=jax.random.PRNGKey(1), prompt_mask=mask, eos_id=eos))
    logp, entropy = completion_logprobs(model.apply, params, prompt, mask, gen.tokens, temperature=0.9)
    # float32; decoding runs the recurrence one token at a time, the forward its chunked / parallel form
    np.testing.assert_allclose(np.where(live, logp, 0.0), gen.logprobs, rtol=1e-4, atol=1e-4)
    assert (np.asarray(entropy) > 0).all() and (np.asarray(entropy) < math.log(64) + 1e-4).all()


def test_grpo_raises_the_expected_reward_of_a_bandit():
    """One prompt, one generated token, reward 1 for token 3 (out of 8): the policy's exact probability
    of token 3 must rise from ~1/8; with the reward flipped, it must fall."""
    vocab, prompt = 8, jnp.zeros((4, 2), jnp.int32)
    model = TransformerLM(TransformerConfig(vocab_size=vocab, d_model=16, n_layer=1, n_heads=2,
                                            d_intermediate=32, pad_vocab_size_multiple=1))
    config = GRPOConfig(group_size=8, temperature=1.0, max_new_tokens=1, entropy_coef=0.0)
    step = make_grpo_step(config)
    ones = jnp.ones((4, 2), jnp.int32)

    def p3(params):
        logits = model.apply({"params": params}, prompt[:1])[0, -1]
        return float(jax.nn.softmax(logits)[3])

    results = {}
    for sign in (1.0, -1.0):
        params = init_params(model, jax.random.PRNGKey(0))
        state = create_train_state(model.apply, params, optax.adam(3e-2))
        start = p3(state.params)
        rewards = []
        for it in range(12):
            state, metrics = grpo_iteration(model, state, step, prompt, ones,
                                            lambda t: (sign * (t[:, 0] == 3)).astype(np.float32),
                                            jax.random.PRNGKey(it), config)
            rewards.append(metrics["reward"])
        results[sign] = (start, p3(state.params))
    start, end = results[1.0]
    assert 0.05 < start < 0.25 and end > 0.6, results
    start, end = results[-1.0]
    assert end < 0.5 * start, results


def test_grpo_config_checks():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="sum")
