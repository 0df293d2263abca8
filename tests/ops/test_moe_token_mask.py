"""`token_mask` (padding kept out of MoE routing): a hand-computed case where a padding token would use an
expert's budget and drop a real token; routing a padded group equals routing its real tokens alone for
every router; metrics equal those of the real tokens
alone; padding output is zero; dense == sorted; argument errors name `token_mask`."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops import load_balancing_loss, mixture_of_experts, route, router_z_loss

FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def scale_by_expert(xe):
    """Expert e multiplies its inputs by (e + 1).  (g, E, C, d) -> same."""
    return xe * (jnp.arange(xe.shape[1], dtype=xe.dtype) + 1)[None, :, None, None]


@functools.partial(jax.jit, static_argnames=("router", "k", "cf", "dispatch"), **FAST)
def moe(x, logits, token_mask, *, router, k=None, cf=1.0, dispatch="dense"):
    return mixture_of_experts(x, logits, scale_by_expert, router=router, k=k, capacity_factor=cf,
                              dispatch=dispatch, token_mask=token_mask)


route_jit = jax.jit(route, static_argnames=("router", "k", "capacity_factor"), **FAST)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# token 0 is padding; every token prefers expert 0
PAD_LOGITS = [[4.0, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0]]


@pytest.mark.parametrize("dispatch", ["dense", "sorted"])
def test_padding_takes_no_slot_hand_case(dispatch):
    """4 tokens (token 0 padding), 2 experts, capacity factor 1: expert 0 keeps at most ceil((p + 1)/2) =
    1, 1, 2, 2 of a sequence's first p + 1 tokens; all prefer expert 0. Without the mask token 0 is kept and
    tokens 1 and 3 are dropped. With it, the real tokens count from p = 0: tokens 1 and 3 are kept and
    token 2 is dropped — exactly what the 3 real tokens alone give."""
    x = jnp.asarray(np.arange(1.0, 13.0).reshape(1, 4, 3), jnp.float32)
    logits = jnp.asarray([PAD_LOGITS], jnp.float32)
    mask = jnp.asarray([[0, 1, 1, 1]], jnp.int32)
    p0 = [sigmoid(a - b) for a, b in PAD_LOGITS]

    y_nomask, m_nomask = moe(x, logits, None, router="switch", dispatch=dispatch)
    assert float(m_nomask["dropped_fraction"]) == pytest.approx(0.5)                # tokens 1, 3 of 4
    np.testing.assert_allclose(y_nomask[0, 1], 0.0)

    y, m = moe(x, logits, mask, router="switch", dispatch=dispatch)
    xs = np.asarray(x[0])
    np.testing.assert_allclose(y[0], np.stack([np.zeros(3), p0[1] * xs[1], np.zeros(3), p0[3] * xs[3]]),
                               rtol=1e-6, atol=1e-6)
    # metrics over the 3 real tokens only, by hand
    real = PAD_LOGITS[1:]
    probs = [[sigmoid(a - b), 1 - sigmoid(a - b)] for a, b in real]
    aux = 2 * (1.0 * sum(p[0] for p in probs) / 3 + 0.0)                             # f = (1, 0)
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in real) / 3
    np.testing.assert_allclose(m["aux_loss"], aux, rtol=1e-6)
    np.testing.assert_allclose(m["z_loss"], z, rtol=1e-6)
    np.testing.assert_allclose(m["dropped_fraction"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["unrouted_fraction"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["expert_load"], [2 / 2, 0.0])
    # ... and equal to the real tokens routed without padding
    y_real, m_real = moe(x[:, 1:], logits[:, 1:], None, router="switch", dispatch=dispatch)
    np.testing.assert_allclose(y[:, 1:], y_real, rtol=1e-6, atol=1e-6)
    for name in m:
        np.testing.assert_allclose(m[name], m_real[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_expert_choice_never_picks_padding():
    """Expert choice, 4 tokens (tokens 0 and 3 padding, the most probable for expert 0), capacity
    ceil(1·4·1/2) = 2: the experts take real tokens only."""
    logits = jnp.asarray([[[5.0, 0.0], [1.0, 0.0], [0.0, 1.0], [6.0, 0.0]]], jnp.float32)
    mask = jnp.asarray([[False, True, True, False]])
    r = route_jit(logits, router="expert_choice", k=1, capacity_factor=1.0, token_mask=mask)
    np.testing.assert_array_equal(r.kept[0], [[False, False], [True, True], [True, True], [False, False]])
    np.testing.assert_array_equal(r.position[0, 0], [2, 2])                      # not kept: position C
    np.testing.assert_array_equal(r.position[0, 1:3], [[0, 1], [1, 0]])
    np.testing.assert_allclose(r.gate[0, 0], 0.0)


def _random_case(seed, g, t, n_exp, d=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(g, t, d)), jnp.float32)
    logits = jnp.asarray(2 * rng.normal(size=(g, t, n_exp)), jnp.float32)
    n_real = rng.integers(1, t + 1, size=g)
    n_real[0] = t                                                   # one unpadded row
    mask = np.arange(t)[None, :] >= (t - n_real)[:, None]           # left padding
    return x, logits, mask, n_real


@pytest.mark.parametrize("router, k", [("switch", 1), ("topk", 2), ("expert_choice", 1)])
def test_padded_routing_equals_routing_the_real_tokens_alone(router, k):
    """Per group, the real tokens' routing with padding equals their routing without it (padding takes no
    slot and shifts no position; token choice: at the same capacity factor, whose causal budget counts real
    tokens only; expert choice, whose fixed budget comes from the length: at the same budget); padding is
    never kept and has gate 0."""
    from mamba_jax.ops.moe import route_expert_choice
    g, t, n_exp, cf = 4, 10, 4, 0.75
    _, logits, mask, n_real = _random_case(1, g, t, n_exp)
    if router == "expert_choice":
        capacity = 3
        ec = jax.jit(route_expert_choice, static_argnames="capacity", **FAST)
        r = ec(logits, capacity=capacity, token_mask=jnp.asarray(mask))
    else:
        r = route_jit(logits, router=router, k=k, capacity_factor=cf, token_mask=jnp.asarray(mask))
    assert not np.any(np.asarray(r.kept)[~mask]) and np.all(np.asarray(r.gate)[~mask] == 0)
    assert not np.asarray(r.kept)[mask].all()                     # the budget binds
    for i in range(g):
        real = logits[i:i + 1, t - n_real[i]:]
        if router == "expert_choice":
            alone = ec(real, capacity=min(capacity, int(n_real[i])))
        else:
            alone = route_jit(real, router=router, k=k, capacity_factor=cf)
        got = jax.tree_util.tree_map(lambda a: np.asarray(a[i, t - n_real[i]:]), r)
        np.testing.assert_array_equal(got.kept, alone.kept[0], err_msg=f"group {i}")
        np.testing.assert_array_equal(np.where(got.kept, got.position, -1),
                                      np.where(alone.kept[0], alone.position[0], -1), err_msg=f"group {i}")
        np.testing.assert_allclose(got.gate, alone.gate[0], rtol=1e-6, err_msg=f"group {i}")


@pytest.mark.parametrize("router, k, cf", [("switch", None, 0.75), ("topk", 2, 1.0), ("expert_choice", None, 1.0)])
def test_metrics_are_those_of_the_real_tokens_and_dense_equals_sorted(router, k, cf):
    g, t, n_exp = 4, 10, 4
    x, logits, mask, n_real = _random_case(2, g, t, n_exp)
    y_d, m_d = moe(x, logits, jnp.asarray(mask), router=router, k=k, cf=cf, dispatch="dense")
    y_s, m_s = moe(x, logits, jnp.asarray(mask), router=router, k=k, cf=cf, dispatch="sorted")
    np.testing.assert_allclose(y_d, y_s, rtol=1e-6, atol=1e-6)
    for name in m_d:
        np.testing.assert_allclose(m_d[name], m_s[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(np.asarray(y_d)[~mask], 0.0)                     # padding: zero output
    # aux loss: mean over groups of each group's real-token aux loss; z-loss: mean over real tokens
    per_group = [float(load_balancing_loss(logits[i:i + 1, t - n_real[i]:])) for i in range(g)]
    np.testing.assert_allclose(m_d["aux_loss"], np.mean(per_group), rtol=1e-5)
    np.testing.assert_allclose(load_balancing_loss(logits, jnp.asarray(mask)), np.mean(per_group), rtol=1e-5)
    real_logits = np.asarray(logits)[mask]
    np.testing.assert_allclose(m_d["z_loss"], router_z_loss(jnp.asarray(real_logits)), rtol=1e-5)
    # fractions over real tokens, from the routing (padding never kept)
    kp = k or 1
    capacity = math.ceil(round(cf * t * kp / n_exp, 9))
    r = route(logits, router=router, k=kp, capacity_factor=cf, token_mask=jnp.asarray(mask))
    kept = np.asarray(r.kept)[mask]                                                # (real tokens, k)
    unrouted = np.mean(~kept.any(-1))
    np.testing.assert_allclose(m_d["unrouted_fraction"], unrouted, rtol=1e-6)
    np.testing.assert_allclose(m_d["dropped_fraction"], unrouted if router == "expert_choice" else np.mean(~kept),
                               rtol=1e-6)
    loads = np.zeros(n_exp)
    np.add.at(loads, np.asarray(r.expert)[mask][kept], 1.0)
    np.testing.assert_allclose(m_d["expert_load"], loads / g / capacity, rtol=1e-6)


def test_all_ones_mask_equals_no_mask():
    x, logits, _, _ = _random_case(3, 3, 8, 4)
    for dispatch in ("dense", "sorted"):
        y0, m0 = moe(x, logits, None, router="topk", k=2, cf=0.75, dispatch=dispatch)
        y1, m1 = moe(x, logits, jnp.ones((3, 8), bool), router="topk", k=2, cf=0.75, dispatch=dispatch)
        np.testing.assert_allclose(y0, y1, rtol=1e-6, atol=1e-7)
        for name in m0:
            np.testing.assert_allclose(m0[name], m1[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_gradients_ignore_padding():
    """No gradient flows to padding tokens' inputs or router logits."""
    x, logits, mask, _ = _random_case(4, 2, 6, 4)

    def loss(x, logits):
        y, m = mixture_of_experts(x, logits, scale_by_expert, router="switch", capacity_factor=1.0,
                                  token_mask=jnp.asarray(mask), dispatch="sorted")
        return jnp.sum(jnp.sin(y)) + m["aux_loss"] + m["z_loss"]

    gx, gl = jax.jit(jax.grad(loss, argnums=(0, 1)), **FAST)(x, logits)
    np.testing.assert_array_equal(np.asarray(gx)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(gl)[~mask], 0.0)


def test_bad_token_mask_is_named():
    x = jnp.ones((2, 4, 3))
    logits = jnp.zeros((2, 4, 2))
    with pytest.raises(ValueError, match=r"mixture_of_experts: `token_mask` must have shape \(2, 4\); got \(2, 3\)"):
        mixture_of_experts(x, logits, scale_by_expert, token_mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="route_expert_choice: `token_mask`"):
        route(logits, router="expert_choice", k=1, capacity_factor=1.0, token_mask=jnp.ones((4,)))
    with pytest.raises(ValueError, match="load_balancing_loss: `token_mask`"):
        load_balancing_loss(logits, jnp.ones((2, 4, 1)))
