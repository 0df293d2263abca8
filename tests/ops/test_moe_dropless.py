"""Dropless MoE (`mixture_of_experts_dropless`, the decoder models' evaluation and decoding default): every
real token reaches its k experts. Checked against an independent per-token numpy loop, against the capacity
path with room for every token (values and gradients), split over expert slices as expert parallelism runs
it, float64 finite differences, and NaN at padding."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mamba_jax.ops import expert_ffn, mixture_of_experts, mixture_of_experts_dropless

FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def case(seed, g, t, d, n_exp, f, dtype=np.float32, bias=False):
    rng = np.random.default_rng(seed)
    arrs = [rng.normal(size=(g, t, d)), rng.normal(size=(g, t, n_exp)) * 1.5,
            rng.normal(size=(n_exp, d, f)) / math.sqrt(d), rng.normal(size=(n_exp, f, d)) / math.sqrt(f)]
    arrs += [rng.normal(size=(n_exp, f)) * 0.3, rng.normal(size=(n_exp, d)) * 0.3] if bias else [None, None]
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in arrs)


def numpy_dropless(x, logits, w_in, w_out, b_in, b_out, k, mask=None):
    """y_t = Σ_{j<k} gate_j · FFN_{e_j}(x_t), e_j the j-th most probable expert (gates renormalised for k > 1)."""
    x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
    wi, wo = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
    bi = np.zeros(wi.shape[::2]) if b_in is None else np.asarray(b_in, np.float64)
    bo = np.zeros((wo.shape[0], wo.shape[2])) if b_out is None else np.asarray(b_out, np.float64)
    g, t, _ = x.shape
    y = np.zeros((g, t, wo.shape[-1]))
    for gi in range(g):
        for tok in range(t):
            if mask is not None and not mask[gi, tok]:
                continue
            p = np.exp(logits[gi, tok] - logits[gi, tok].max())
            p /= p.sum()
            chosen = np.argsort(-p, kind="stable")[:k]
            gates = p[chosen] / p[chosen].sum() if k > 1 else p[chosen]
            for e, gw in zip(chosen, gates):
                y[gi, tok] += gw * (np.maximum(x[gi, tok] @ wi[e] + bi[e], 0) @ wo[e] + bo[e])
    return y


@pytest.mark.parametrize("router, k, bias", [("switch", 1, False), ("topk", 2, True), ("topk", 3, False)])
def test_dropless_equals_per_token_numpy_loop(router, k, bias):
    x, logits, w_in, w_out, b_in, b_out = case(k, 2, 9, 4, 5, 6, bias=bias)
    mask = np.ones((2, 9), bool)
    mask[1, :3] = False
    run = jax.jit(lambda *a: mixture_of_experts_dropless(*a, router=router, k=k, token_mask=jnp.asarray(mask)), **FAST)
    y, m = run(x, logits, w_in, w_out, b_in, b_out)
    np.testing.assert_allclose(y, numpy_dropless(x, logits, w_in, w_out, b_in, b_out, k, mask), rtol=2e-5, atol=2e-5)
    assert float(m["dropped_fraction"]) == 0.0 and float(m["unrouted_fraction"]) == 0.0
    # expert_load: each expert's assignments over a uniform share ceil(t·k/E), mean over groups
    probs = jax.nn.softmax(logits, -1)
    top = np.asarray(jax.lax.top_k(probs, k)[1])
    load = np.zeros(5)
    for gi in range(2):
        for e in top[gi][mask[gi]].reshape(-1):
            load[e] += 1
    np.testing.assert_allclose(m["expert_load"], load / 2 / math.ceil(9 * k / 5), rtol=1e-6)


def test_dropless_equals_capacity_path_with_room_for_everyone_in_values_and_gradients():
    """C = t leaves room for every token: the capacity path then computes the same function."""
    x, logits, w_in, w_out, _, _ = case(5, 2, 8, 4, 4, 5)
    cot = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)

    @functools.partial(jax.jit, **FAST)
    def both(args):
        def loss(dropless, xx, lg, wi, wo):
            if dropless:
                y, m = mixture_of_experts_dropless(xx, lg, wi, wo, router="topk", k=2)
            else:
                y, m = mixture_of_experts(xx, lg, lambda xe: expert_ffn(xe, wi, wo), router="topk", k=2,
                                          capacity_factor=2.0, dispatch="sorted")   # C = ceil(2·8·2/4) = 8 = t
            return jnp.sum(y * cot) + 0.3 * m["aux_loss"], y
        return [jax.value_and_grad(functools.partial(loss, dl), argnums=(0, 1, 2, 3), has_aux=True)(*args)
                for dl in (True, False)]

    ((_, y_a), g_a), ((_, y_b), g_b) = both((x, logits, w_in, w_out))
    np.testing.assert_allclose(y_a, y_b, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("x", "logits", "w_in", "w_out"), g_a, g_b):
        assert float(jnp.abs(b).max()) > 0, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_expert_slices_sum_to_the_whole():
    """What an expert-parallel device computes: its experts' share (first_expert, E_l weights); the shares
    summed over the slices equal the whole layer."""
    x, logits, w_in, w_out, b_in, b_out = case(3, 2, 7, 4, 6, 5, bias=True)
    run = jax.jit(lambda *a, first: mixture_of_experts_dropless(*a, router="topk", k=2, first_expert=first)[0],
                  static_argnames="first", **FAST)
    whole = run(x, logits, w_in, w_out, b_in, b_out, first=0)
    parts = [run(x, logits, w_in[s:s + 2], w_out[s:s + 2], b_in[s:s + 2], b_out[s:s + 2], first=s) for s in (0, 2, 4)]
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-5, atol=1e-6)
    assert all(float(jnp.abs(p).max()) > 0 for p in parts)


def test_float64_check_grads():
    with jax.enable_x64(True):
        x, logits, w_in, w_out, b_in, b_out = case(21, 2, 5, 3, 3, 4, dtype=np.float64, bias=True)

        @jax.jit
        def f(xx, lg, wi, wo, bi, bo):
            y, m = mixture_of_experts_dropless(xx, lg, wi, wo, bi, bo, router="topk", k=2)
            return y, m["aux_loss"], m["z_loss"]

        assert f(x, logits, w_in, w_out, b_in, b_out)[0].dtype == jnp.float64
        check_grads(f, (x, logits, w_in, w_out, b_in, b_out), order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("dropless", [True, False])
def test_nan_at_padding_reaches_no_real_token(dropless):
    """Padding holds NaN inputs and logits: real tokens' outputs are unchanged and finite (masks select).
    Both the dropless path and the dense one-hot dispatch (an einsum over tokens, where 0 · NaN = NaN
    would reach every slot) are covered."""
    x, logits, w_in, w_out, _, _ = case(4, 2, 6, 4, 4, 5)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], bool)
    poison = lambda a: jnp.where(mask[..., None], a, jnp.nan)

    def run(xx, lg):
        if dropless:
            return mixture_of_experts_dropless(xx, lg, w_in, w_out, router="switch", token_mask=mask)[0]
        return mixture_of_experts(xx, lg, lambda xe: expert_ffn(xe, w_in, w_out), router="switch",
                                  capacity_factor=1.0, dispatch="dense", token_mask=mask)[0]

    def run_and_grads(xx, lg):      # outputs, metrics and gradients, with NaN only under the mask
        (loss, (y, m)), grads = jax.value_and_grad(
            lambda a, b: (lambda y, m: (jnp.sum(jnp.where(mask[..., None], y, 0) ** 2) + m["aux_loss"] + m["z_loss"],
                                        (y, m)))(*run_full(a, b)), argnums=(0, 1), has_aux=True)(xx, lg)
        return y, m, grads

    def run_full(xx, lg):
        if dropless:
            return mixture_of_experts_dropless(xx, lg, w_in, w_out, router="switch", token_mask=mask)
        return mixture_of_experts(xx, lg, lambda xe: expert_ffn(xe, w_in, w_out), router="switch",
                                  capacity_factor=1.0, dispatch="dense", token_mask=mask)

    clean, dirty = run(x, logits), run(poison(x), poison(logits))
    np.testing.assert_array_equal(np.asarray(dirty)[np.asarray(mask)], np.asarray(clean)[np.asarray(mask)])
    assert np.isfinite(np.asarray(dirty)[np.asarray(mask)]).all()
    _, m_clean, g_clean = run_and_grads(x, logits)
    _, m_dirty, g_dirty = run_and_grads(poison(x), poison(logits))
    for name in m_clean:           # the metrics (aux, z-loss, fractions, loads) see no NaN either
        np.testing.assert_allclose(m_dirty[name], m_clean[name], rtol=1e-6, err_msg=name)
    for a, b in zip(g_dirty, g_clean):   # nor do the gradients (zero at the padding)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_expert_choice_has_no_dropless_form():
    x, logits, w_in, w_out, _, _ = case(0, 1, 4, 3, 4, 2)
    with pytest.raises(ValueError, match="expert-choice routing has no dropless form"):
        mixture_of_experts_dropless(x, logits, w_in, w_out, router="expert_choice")
