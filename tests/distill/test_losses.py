"""KD losses against definitions written independently in float64 numpy, known identities, masks,
extreme logits, bf16 inputs, the top-k teacher, hidden-state alignment and input validation.

Expected values always come from the numpy reference below (never from `mamba_jax.distill`)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_jax.distill import losses as L

# Every call goes through jax.jit: one compiled program per shape is ~5x cheaper on CPU than eager
# dispatch of each primitive. Validation runs at trace time, so the error tests call `L.*` directly.
_T2 = "scale_by_temperature_squared"
forward_kl = jax.jit(L.forward_kl, static_argnames=(_T2,))
reverse_kl = jax.jit(L.reverse_kl, static_argnames=(_T2,))
jsd = jax.jit(L.jsd, static_argnames=(_T2,))
forward_kl_topk = jax.jit(L.forward_kl_topk, static_argnames=(_T2,))
kd_loss = jax.jit(L.kd_loss, static_argnames=(_T2, "kind"))
hidden_mse = jax.jit(L.hidden_mse)
hidden_cosine = jax.jit(L.hidden_cosine)


def grad(f, argnums=0):
    return jax.jit(jax.grad(f, argnums=argnums))


def value_and_grad(f, argnums=0):
    return jax.jit(jax.value_and_grad(f, argnums=argnums))

# ----------------------------------------------------------------------------- float64 numpy reference


def np_softmax(x, T=1.0):
    z = np.asarray(x, np.float64) / T
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x, T=1.0):
    z = np.asarray(x, np.float64) / T
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_kl_tokens(p, log_p, log_q):
    """Σ_v p (log p − log q), terms with p = 0 dropped. (..., V) -> (...)."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def np_mean(per_token, mask):
    if mask is None:
        return per_token.mean()
    keep = np.asarray(mask) != 0
    return per_token[keep].sum() / max(keep.sum(), 1)


def np_forward_kl(s, t, T=1.0, mask=None, t2=False):
    p, lp, lq = np_softmax(t, T), np_log_softmax(t, T), np_log_softmax(s, T)
    return np_mean(np_kl_tokens(p, lp, lq), mask) * (T * T if t2 else 1.0)


def np_reverse_kl(s, t, T=1.0, mask=None, t2=False):
    q, lp, lq = np_softmax(s, T), np_log_softmax(t, T), np_log_softmax(s, T)
    return np_mean(np_kl_tokens(q, lq, lp), mask) * (T * T if t2 else 1.0)


def np_jsd(s, t, beta=0.5, T=1.0, mask=None, t2=False):
    """β·KL(P||M) + (1−β)·KL(Q||M) with M = βP + (1−β)Q formed in probability space; P teacher, Q student."""
    p, q = np_softmax(t, T), np_softmax(s, T)
    m = beta * p + (1 - beta) * q
    with np.errstate(divide="ignore"):
        lp, lq, lm = np.log(p), np.log(q), np.log(m)
    per = beta * np_kl_tokens(p, lp, lm) + (1 - beta) * np_kl_tokens(q, lq, lm)
    return np_mean(per, mask) * (T * T if t2 else 1.0)


def np_topk_forward_kl(s, top_vals, top_idx, T=1.0, mask=None):
    p = np_softmax(top_vals, T)
    lp = np_log_softmax(top_vals, T)
    lq = np.take_along_axis(np_log_softmax(s, T), top_idx, axis=-1)
    return np_mean(np_kl_tokens(p, lp, lq), mask)


def np_cross_entropy(s, labels, mask=None):
    ls = np_log_softmax(s)
    nll = -np.take_along_axis(ls, labels[..., None], axis=-1)[..., 0]
    return np_mean(nll, mask)


NP_REF = {"forward_kl": np_forward_kl, "reverse_kl": np_reverse_kl, "jsd": np_jsd}
FNS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def logits(seed, shape, scale=2.0, dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def random_mask(seed, shape, p_keep=0.6):
    m = np.random.default_rng(seed).random(shape) < p_keep
    m.flat[0] = True
    return m


# ----------------------------------------------------------------------------- values vs numpy


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T,t2", [(1.0, False), (2.5, False), (0.5, True)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy_float32(name, T, t2, masked):
    s, t = logits(1, (2, 5, 11)), logits(2, (2, 5, 11))
    mask = random_mask(3, (2, 5)) if masked else None
    got = FNS[name](jnp.asarray(s), jnp.asarray(t), temperature=T, mask=None if mask is None else jnp.asarray(mask),
                    scale_by_temperature_squared=t2)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), NP_REF[name](s, t, T=T, mask=mask, t2=t2), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_numpy(beta):
    s, t = logits(4, (3, 4, 7)), logits(5, (3, 4, 7))
    np.testing.assert_allclose(float(jsd(s, t, beta=beta, temperature=1.5)), np_jsd(s, t, beta=beta, T=1.5),
                               rtol=2e-5, atol=1e-7)


def test_float64_stays_float64():
    with jax.enable_x64(True):
        s, t = logits(6, (2, 3, 9), dtype=np.float64), logits(7, (2, 3, 9), dtype=np.float64)
        mask = random_mask(8, (2, 3))
        for name, fn in FNS.items():
            got = fn(jnp.asarray(s), jnp.asarray(t), temperature=1.7, mask=jnp.asarray(mask))
            assert got.dtype == jnp.float64, name
            np.testing.assert_allclose(float(got), NP_REF[name](s, t, T=1.7, mask=mask), rtol=1e-12, err_msg=name)


@settings(max_examples=5, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), v=st.integers(2, 9),
       T=st.floats(0.3, 4.0), seed=st.integers(0, 2**16), use_mask=st.booleans())
def test_shapes_and_temperatures_hypothesis(lead, v, T, seed, use_mask):
    shape = tuple(lead) + (v,)
    s, t = logits(seed, shape, scale=3.0), logits(seed + 1, shape, scale=3.0)
    mask = random_mask(seed + 2, shape[:-1]) if use_mask else None
    got = _all_three(s, t, T, mask)  # one compilation per drawn shape
    for name in FNS:
        np.testing.assert_allclose(float(got[name]), NP_REF[name](s, t, T=T, mask=mask), rtol=5e-5, atol=2e-6,
                                   err_msg=name)


@jax.jit
def _all_three(s, t, T, mask):
    return {name: getattr(L, name)(s, t, temperature=T, mask=mask) for name in FNS}


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_iff_equal(name):
    s = logits(9, (3, 4, 10))
    fn = FNS[name]
    assert abs(float(fn(s, s))) < 1e-6
    assert abs(float(fn(s, s + 3.0, temperature=2.0))) < 1e-6  # a shift per token is the same distribution
    other = s.copy()
    other[1, 2, 3] += 1.0  # one token's distribution differs a little
    assert float(fn(s, other)) > 1e-4
    assert float(fn(s, logits(10, s.shape))) > 1e-2


def test_jsd_symmetric_at_half_and_beta_swap():
    s, t = logits(11, (2, 6, 8)), logits(12, (2, 6, 8))
    np.testing.assert_allclose(float(jsd(s, t)), float(jsd(t, s)), rtol=1e-6)
    np.testing.assert_allclose(float(jsd(s, t, beta=0.2)), float(jsd(t, s, beta=0.8)), rtol=1e-5)
    assert abs(float(jsd(s, t, beta=0.2)) - float(jsd(t, s, beta=0.2))) > 1e-4  # not symmetric otherwise


def test_jsd_bounded_by_log2():
    v = 6
    s_far = np.full((v, v), -1e4, np.float32)
    t_far = np.full((v, v), -1e4, np.float32)
    for i in range(v):  # disjoint one-hot distributions: JSD_0.5 reaches log 2
        s_far[i, i] = 1e4
        t_far[i, (i + 1) % v] = 1e4
    got = float(jsd(s_far, t_far))
    np.testing.assert_allclose(got, math.log(2), rtol=1e-6)
    for seed in range(5):
        s, t = logits(20 + seed, (4, v), scale=10.0), logits(40 + seed, (4, v), scale=10.0)
        assert 0.0 <= float(jsd(s, t)) <= math.log(2) + 1e-6


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_limits_are_zero_with_finite_gradients(beta):
    s, t = logits(13, (2, 3, 7)), logits(14, (2, 3, 7))
    value, (gs, gt) = value_and_grad(lambda a, b: jsd(a, b, beta=beta), argnums=(0, 1))(s, t)
    assert float(value) == 0.0
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
    np.testing.assert_allclose(np.asarray(gs), 0.0, atol=1e-7)


def test_jsd_near_limits_approaches_kl():
    """JSD_β / β → KL(P||Q) as β → 0 and JSD_β / (1 − β) → KL(Q||P) as β → 1 (float64)."""
    with jax.enable_x64(True):
        s, t = logits(15, (2, 3, 7), dtype=np.float64), logits(16, (2, 3, 7), dtype=np.float64)
        eps = 1e-6
        np.testing.assert_allclose(float(jsd(s, t, beta=eps)) / eps, np_forward_kl(s, t), rtol=1e-4)
        np.testing.assert_allclose(float(jsd(s, t, beta=1 - eps)) / eps, np_reverse_kl(s, t), rtol=1e-4)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("T,t2", [(1.0, False), (2.0, False), (3.0, True)])
def test_forward_kl_gradient_identity(T, t2):
    """d forward_kl / d s = (softmax(s/T) − softmax(t/T)) / T / N per unmasked token (× T² if scaled)."""
    s, t = logits(17, (2, 5, 9)), logits(18, (2, 5, 9))
    mask = random_mask(19, (2, 5))
    g_s = grad(lambda a: forward_kl(a, t, temperature=T, mask=mask, scale_by_temperature_squared=t2))(s)
    expected = (np_softmax(s, T) - np_softmax(t, T)) / T / mask.sum() * (T * T if t2 else 1.0)
    expected = np.where(mask[..., None], expected, 0.0)
    np.testing.assert_allclose(np.asarray(g_s), expected, rtol=1e-4, atol=1e-7)


def test_forward_kl_gradient_identity_float64():
    with jax.enable_x64(True):
        s, t = logits(21, (3, 4, 6), dtype=np.float64), logits(22, (3, 4, 6), dtype=np.float64)
        g_s = grad(lambda a: forward_kl(a, t, temperature=1.3))(s)
        expected = (np_softmax(s, 1.3) - np_softmax(t, 1.3)) / 1.3 / 12
        np.testing.assert_allclose(np.asarray(g_s), expected, rtol=1e-10, atol=1e-14)


def test_reverse_kl_gradient_vs_numpy_finite_differences():
    """Reverse KL's gradient has no one-line form; central differences of the numpy definition (float64)."""
    with jax.enable_x64(True):
        s, t = logits(23, (2, 5), dtype=np.float64), logits(24, (2, 5), dtype=np.float64)
        g_s = np.asarray(grad(lambda a: reverse_kl(a, t, temperature=1.5))(s))
        h, fd = 1e-6, np.zeros_like(s)
        for idx in np.ndindex(s.shape):
            up, down = s.copy(), s.copy()
            up[idx] += h
            down[idx] -= h
            fd[idx] = (np_reverse_kl(up, t, T=1.5) - np_reverse_kl(down, t, T=1.5)) / (2 * h)
        np.testing.assert_allclose(g_s, fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_masked_tokens_change_nothing(name):
    fn = FNS[name]
    s, t = logits(25, (2, 6, 8)), logits(26, (2, 6, 8))
    mask = random_mask(27, (2, 6))
    s2, t2 = s.copy(), t.copy()
    s2[~mask] = logits(28, s2[~mask].shape, scale=50.0)
    t2[~mask] = logits(29, t2[~mask].shape, scale=50.0)
    np.testing.assert_allclose(float(fn(s2, t2, mask=mask)), float(fn(s, t, mask=mask)), rtol=1e-6)
    # ... equals the loss over the kept tokens alone
    np.testing.assert_allclose(float(fn(s, t, mask=mask)), float(fn(s[mask], t[mask])), rtol=1e-6)
    gs, gt = grad(lambda a, b: fn(a, b, mask=mask), argnums=(0, 1))(s2, t2)
    assert np.all(np.asarray(gs)[~mask] == 0) and np.all(np.asarray(gt)[~mask] == 0)
    assert np.any(np.asarray(gs)[mask] != 0)


def test_integer_mask_same_as_bool():
    s, t = logits(30, (2, 4, 5)), logits(31, (2, 4, 5))
    mask = random_mask(32, (2, 4))
    np.testing.assert_allclose(float(forward_kl(s, t, mask=mask.astype(np.int32))),
                               float(forward_kl(s, t, mask=mask)), rtol=1e-7)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_all_masked_is_zero_not_nan(name):
    s, t = logits(33, (2, 3, 5)), logits(34, (2, 3, 5))
    mask = np.zeros((2, 3), bool)
    value, g_s = value_and_grad(lambda a: FNS[name](a, t, mask=mask))(s)
    assert float(value) == 0.0
    assert np.all(np.asarray(g_s) == 0)
    assert float(hidden_mse(s, t, mask=mask)) == 0.0
    assert float(hidden_cosine(s, t, mask=mask)) == 0.0


# ----------------------------------------------------------------------------- extreme logits, dtypes, jit


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_logits_pm_1e4_finite_and_correct(name):
    rng = np.random.default_rng(35)
    s = rng.choice([-1e4, 0.0, 1e4], size=(3, 4, 6)).astype(np.float32) + rng.normal(size=(3, 4, 6)).astype(np.float32)
    t = rng.choice([-1e4, 0.0, 1e4], size=(3, 4, 6)).astype(np.float32)
    value, g_s = value_and_grad(lambda a: FNS[name](a, t))(s)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g_s)))
    np.testing.assert_allclose(float(value), NP_REF[name](s, t), rtol=1e-5)


def test_teacher_minus_inf_padding_is_ignored():
    """Padded vocabulary entries with teacher logit −inf contribute 0 to forward KL, and nothing is NaN."""
    s, t = logits(36, (2, 3, 8)), logits(37, (2, 3, 8))
    t_pad = t.copy()
    t_pad[..., 6:] = -np.inf
    value, g_s = value_and_grad(lambda a: forward_kl(a, t_pad))(s)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g_s)))
    np.testing.assert_allclose(float(value), np_forward_kl(s, t_pad), rtol=1e-5)


def test_bf16_inputs_computed_in_float32():
    s32, t32 = logits(38, (2, 4, 16), scale=4.0), logits(39, (2, 4, 16), scale=4.0)
    s, t = jnp.asarray(s32, jnp.bfloat16), jnp.asarray(t32, jnp.bfloat16)
    s_np, t_np = np.asarray(s.astype(jnp.float32)), np.asarray(t.astype(jnp.float32))  # the bf16 values, exactly
    for name, fn in FNS.items():
        got = fn(s, t, temperature=2.0)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(float(got), NP_REF[name](s_np, t_np, T=2.0), rtol=2e-5, err_msg=name)
    big = jnp.asarray(np.where(s32 > 0, 1e4, -1e4), jnp.bfloat16)
    assert np.isfinite(float(forward_kl(big, t))) and np.isfinite(float(jsd(big, t)))


def test_under_jit_with_traced_temperature():
    s, t = logits(40, (2, 3, 7)), logits(41, (2, 3, 7))
    mask = random_mask(42, (2, 3))
    f = jax.jit(functools.partial(L.jsd, beta=0.3, temperature=2.0, scale_by_temperature_squared=True))
    np.testing.assert_allclose(float(f(s, t, mask=mask)), np_jsd(s, t, beta=0.3, T=2.0, mask=mask, t2=True),
                               rtol=2e-5)
    g = jax.jit(lambda a, b, T: L.forward_kl(a, b, temperature=T))  # a traced temperature works too
    np.testing.assert_allclose(float(g(s, t, 1.7)), np_forward_kl(s, t, T=1.7), rtol=2e-5)


# ----------------------------------------------------------------------------- top-k teacher


def test_topk_with_k_equal_vocab_equals_full_loss():
    s, t = logits(43, (2, 5, 9)), logits(44, (2, 5, 9))
    mask = random_mask(45, (2, 5))
    rng = np.random.default_rng(46)
    idx = np.stack([rng.permutation(9) for _ in range(10)]).reshape(2, 5, 9).astype(np.int32)  # any order
    vals = np.take_along_axis(t, idx, axis=-1)
    got = forward_kl_topk(s, vals, idx, temperature=1.5, mask=mask)
    np.testing.assert_allclose(float(got), float(forward_kl(s, t, temperature=1.5, mask=mask)), rtol=1e-6)
    np.testing.assert_allclose(float(got), np_forward_kl(s, t, T=1.5, mask=mask), rtol=2e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_topk_matches_numpy_and_gradient(k):
    s, t = logits(47, (3, 4, 10)), logits(48, (3, 4, 10))
    mask = random_mask(49, (3, 4))
    idx = np.argsort(-t, axis=-1)[..., :k].astype(np.int32)
    vals = np.take_along_axis(t, idx, axis=-1)
    T = 2.0
    value, g_s = value_and_grad(lambda a: forward_kl_topk(a, vals, idx, temperature=T, mask=mask))(s)
    np.testing.assert_allclose(float(value), np_topk_forward_kl(s, vals, idx, T=T, mask=mask), rtol=2e-5)
    p_hat = np.zeros_like(s, np.float64)
    np.put_along_axis(p_hat, idx, np_softmax(vals, T), axis=-1)
    expected = np.where(mask[..., None], (np_softmax(s, T) - p_hat) / T / mask.sum(), 0.0)
    np.testing.assert_allclose(np.asarray(g_s), expected, rtol=1e-4, atol=1e-7)


def test_topk_minus_inf_padding():
    s, t = logits(50, (2, 6)), logits(51, (2, 6))
    idx = np.argsort(-t, axis=-1)[..., :4].astype(np.int32)
    vals = np.take_along_axis(t, idx, axis=-1)
    padded = vals.copy()
    padded[..., 3] = -np.inf  # a stored "no entry"
    value, g_s = value_and_grad(lambda a: forward_kl_topk(a, padded, idx))(s)
    assert np.all(np.isfinite(np.asarray(g_s)))
    np.testing.assert_allclose(float(value), np_topk_forward_kl(s, vals[..., :3], idx[..., :3]), rtol=2e-5)


# ----------------------------------------------------------------------------- kd_loss (KL + CE mixing)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_mixes_kl_and_ce(kind):
    s, t = logits(52, (2, 5, 7)), logits(53, (2, 5, 7))
    labels = np.random.default_rng(54).integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = random_mask(55, (2, 5))
    ref_kl = (NP_REF[kind](s, t, beta=0.3, T=2.0, mask=mask, t2=True) if kind == "jsd"
              else NP_REF[kind](s, t, T=2.0, mask=mask, t2=True))
    ref_ce = np_cross_entropy(s, labels, mask)
    loss, metrics = kd_loss(s, labels, teacher_logits=t, kind=kind, w_kl=0.1, w_ce=1.0, temperature=2.0, beta=0.3,
                            mask=mask, scale_by_temperature_squared=True)
    np.testing.assert_allclose(float(metrics["kl"]), ref_kl, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["ce"]), ref_ce, rtol=2e-5)
    np.testing.assert_allclose(float(loss), 0.1 * ref_kl + 1.0 * ref_ce, rtol=2e-5)
    acc = ((s.argmax(-1) == labels) & mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)


def test_kd_loss_topk_teacher_and_no_mask():
    s, t = logits(56, (2, 3, 8)), logits(57, (2, 3, 8))
    labels = np.random.default_rng(58).integers(0, 8, size=(2, 3)).astype(np.int32)
    idx = np.argsort(-t, axis=-1)[..., :3].astype(np.int32)
    vals = np.take_along_axis(t, idx, axis=-1)
    loss, metrics = kd_loss(s, labels, teacher_topk=(vals, idx), w_kl=0.7, w_ce=0.3)
    expected = 0.7 * np_topk_forward_kl(s, vals, idx) + 0.3 * np_cross_entropy(s, labels)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


# ----------------------------------------------------------------------------- hidden-state alignment


def np_cos_loss(a, b, eps=1e-8):
    na = np.maximum(np.linalg.norm(a, axis=-1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
    return 1.0 - (a * b).sum(-1) / (na * nb)


def test_hidden_mse_and_cosine_vs_numpy():
    hs, ht = logits(59, (2, 5, 6), 1.0), logits(60, (2, 5, 4), 1.0)
    w = logits(61, (6, 4), 0.5)
    mask = random_mask(62, (2, 5))
    proj = hs.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(float(hidden_mse(hs, ht, projection=w, mask=mask)),
                               np_mean(((proj - ht) ** 2).mean(-1), mask), rtol=1e-5)
    np.testing.assert_allclose(float(hidden_cosine(hs, ht, projection=w, mask=mask)),
                               np_mean(np_cos_loss(proj, ht.astype(np.float64)), mask), rtol=1e-5)
    ht_same = logits(63, (2, 5, 6), 1.0)
    np.testing.assert_allclose(float(hidden_mse(hs, ht_same)), ((hs.astype(np.float64) - ht_same) ** 2).mean(),
                               rtol=1e-5)


def test_hidden_identities_and_gradients():
    h = logits(64, (3, 4, 5), 1.0)
    assert float(hidden_mse(h, h)) == 0.0
    assert abs(float(hidden_cosine(3.0 * h, h))) < 1e-6  # scale-invariant
    np.testing.assert_allclose(float(hidden_cosine(-h, h)), 2.0, rtol=1e-6)
    zero = np.zeros_like(h)
    value, g_s = value_and_grad(lambda a: hidden_cosine(a, h))(zero)
    np.testing.assert_allclose(float(value), 1.0)
    assert np.all(np.isfinite(np.asarray(g_s)))
    # the projection is an ordinary differentiable parameter; masked tokens give it no gradient
    w = logits(65, (5, 5), 0.3)
    mask = random_mask(66, (3, 4))
    h2 = h.copy()
    h2[~mask] = 100.0
    g1 = grad(lambda p: hidden_mse(h, h, projection=p, mask=mask))(w)
    g2 = grad(lambda p: hidden_mse(h2, h2, projection=p, mask=mask))(w)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6)
    hk = h[mask].astype(np.float64)
    expected = 2 * hk.T @ (hk @ w.astype(np.float64) - hk) / (hk.shape[0] * 5)  # d/dW mean_tokens mean_d (hW − h)²
    np.testing.assert_allclose(np.asarray(g1), expected, rtol=1e-4, atol=1e-7)


def test_hidden_bf16_to_float32():
    hs = jnp.asarray(logits(67, (2, 3, 4), 1.0), jnp.bfloat16)
    ht = jnp.asarray(logits(68, (2, 3, 4), 1.0), jnp.bfloat16)
    out = hidden_mse(hs, ht)
    assert out.dtype == jnp.float32
    a, b = np.asarray(hs.astype(jnp.float32), np.float64), np.asarray(ht.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(float(out), ((a - b) ** 2).mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- input validation


S = np.zeros((2, 3, 5), np.float32)


@pytest.mark.parametrize("call,pattern", [
    (lambda: L.forward_kl(S, np.zeros((2, 3, 6), np.float32)), r"vocabularies differ.*V=5.*V=6.*shape \(2, 3, 5\)"),
    (lambda: L.reverse_kl(S, np.zeros((2, 4, 5), np.float32)), r"reverse_kl: `teacher_logits` must have shape \(2, 3, 5\).*got \(2, 4, 5\)"),
    (lambda: L.jsd(S, S, mask=np.ones((2, 3, 5), bool)), r"jsd: `mask` must have shape \(2, 3\).*got \(2, 3, 5\)"),
    (lambda: L.forward_kl(S, S, mask=np.ones((3, 2), bool)), r"`mask` must have shape \(2, 3\)"),
    (lambda: L.forward_kl(S.astype(np.int32), S), r"`student_logits` must be a floating-point array"),
    (lambda: L.forward_kl(S, S, temperature=0.0), r"`temperature` must be > 0"),
    (lambda: L.jsd(S, S, beta=1.5), r"`beta` must be in \[0, 1\]"),
    (lambda: L.forward_kl_topk(S, np.zeros((2, 3, 2), np.float32), np.zeros((2, 3, 3), np.int32)),
     r"`teacher_topk_indices` must have shape \(2, 3, 2\).*got \(2, 3, 3\)"),
    (lambda: L.forward_kl_topk(S, np.zeros((2, 3, 2), np.float32), np.zeros((2, 3, 2), np.float32)),
     r"`teacher_topk_indices` must be an integer array"),
    (lambda: L.forward_kl_topk(S, np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.int32)),
     r"`teacher_topk_logits` must have shape \(2, 3, \?\)"),
    (lambda: L.forward_kl_topk(S, np.zeros((2, 3, 6), np.float32), np.zeros((2, 3, 6), np.int32)),
     r"k=6 entries.*vocabulary V=5"),
    (lambda: L.kd_loss(S, np.zeros((2, 3), np.int32)), r"exactly one of `teacher_logits`"),
    (lambda: L.kd_loss(S, np.zeros((2, 4), np.int32), teacher_logits=S), r"`labels` must have shape \(2, 3\)"),
    (lambda: L.kd_loss(S, np.zeros((2, 3), np.int32), teacher_logits=S, kind="kl"), r"`kind` must be one of"),
    (lambda: L.kd_loss(S, np.zeros((2, 3), np.int32), teacher_topk=(S, S.astype(np.int32)), kind="jsd"),
     r"top-k teacher supports only kind='forward_kl'"),
    (lambda: L.hidden_mse(S, np.zeros((2, 3, 4), np.float32)), r"`teacher_hidden` must have shape \(2, 3, 5\).*projection"),
    (lambda: L.hidden_cosine(S, np.zeros((2, 3, 4), np.float32), projection=np.zeros((4, 5), np.float32)),
     r"`projection` must have shape \(5, 4\)"),
    (lambda: L.hidden_mse(S, np.zeros((2, 2, 4), np.float32), projection=np.zeros((5, 4), np.float32)),
     r"`teacher_hidden` must have shape \(2, 3, \?\)"),
])
def test_errors_name_argument_and_shape(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
