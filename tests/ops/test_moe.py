"""MoE routing math against hand-computed cases and an independent numpy loop; the dense and sort-based
dispatch paths agree in values and gradients; float64 finite-difference gradient checks."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mamba_jax.ops import (expert_capacity, expert_ffn, load_balancing_loss, mixture_of_experts, route,
                           router_jitter, router_z_loss)
from mamba_jax.ops.moe import causal_slots, prefix_capacity


# Tiny programs, many compiles: XLA:CPU backend optimisation level 0 compiles ~40% faster (same results).
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(jax.jit, static_argnames=("router", "k", "cf", "dispatch"), **FAST)
def moe_ffn(x, logits, w_in, w_out, *, router, k=None, cf=1.0, dispatch="dense"):
    """`mixture_of_experts` with ReLU FFN experts, jitted (one compile per case keeps the tests fast)."""
    return mixture_of_experts(x, logits, lambda xe: expert_ffn(xe, w_in, w_out), router=router, k=k,
                              capacity_factor=cf, dispatch=dispatch)


@functools.partial(jax.jit, static_argnames=("router", "k", "cf", "dispatch"), **FAST)
def moe_scaled(x, logits, *, router, k=None, cf=1.0, dispatch="dense"):
    """`mixture_of_experts` with `scale_by_expert` experts, jitted."""
    return mixture_of_experts(x, logits, scale_by_expert, router=router, k=k, capacity_factor=cf,
                              dispatch=dispatch)


route_jit = jax.jit(route, static_argnames=("router", "k", "capacity_factor"), **FAST)


def scale_by_expert(xe):
    """A transparent expert_fn: expert e multiplies its inputs by (e + 1).  (g, E, C, d) -> same."""
    return xe * (jnp.arange(xe.shape[1], dtype=xe.dtype) + 1)[None, :, None, None]


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# ------------------------------------------------------------------------------------------- capacity

@pytest.mark.parametrize("tokens, experts, k, cf, expected", [
    (4, 2, 1, 1.0, 2),        # ceil(4/2)
    (8, 3, 2, 1.0, 6),        # ceil(16/3) = ceil(5.33)
    (10, 11, 1, 1.1, 1),      # 1.1·10/11 = 1.0 exactly in real arithmetic (not 1.0000000000000002 -> 2)
    (16, 4, 1, 1.25, 5),      # ceil(5.0)
    (16, 4, 1, 1.3, 6),       # ceil(5.2)
    (4, 8, 1, 0.1, 1),        # at least one slot
    (4, 2, 2, 8.0, 4),        # never more than the tokens of a group
])
def test_expert_capacity(tokens, experts, k, cf, expected):
    assert expert_capacity(tokens, experts, k, cf) == expected


@pytest.mark.parametrize("cf", [0, -1.0, True, "1"])
def test_expert_capacity_rejects_bad_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(4, 2, 1, cf)


# --------------------------------------------------------------------------------- hand-computed cases

SWITCH_LOGITS = [[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 0.0]]


def test_switch_hand_case():
    """4 tokens, 2 experts, capacity factor 1: an expert keeps at most ceil((p + 1)/2) = 1, 1, 2, 2 of the
    first p + 1 tokens (row buffer C = 2). Top-1 choices: e0, e0, e1, e0. Token 1 is expert 0's second
    token while its budget is still 1: dropped; token 3 finds the budget grown to 2: kept. Order is token
    order, not probability, and no token is ever displaced by a later one."""
    x = jnp.asarray(np.arange(1.0, 13.0).reshape(1, 4, 3), jnp.float32)
    logits = jnp.asarray([SWITCH_LOGITS], jnp.float32)
    p0 = [sigmoid(a - b) for a, b in SWITCH_LOGITS]             # P(expert 0) per token
    probs = [[q, 1.0 - q] for q in p0]

    r = route_jit(logits, router="switch", k=1, capacity_factor=1.0)
    np.testing.assert_array_equal(r.expert[0, :, 0], [0, 0, 1, 0])
    np.testing.assert_array_equal(r.position[0, :, 0], [0, 2, 0, 1])   # 2 == capacity: dropped
    np.testing.assert_array_equal(r.kept[0, :, 0], [True, False, True, True])
    np.testing.assert_allclose(r.gate[0, :, 0], [probs[0][0], 0.0, probs[2][1], probs[3][0]], rtol=1e-6)

    for dispatch in ("dense", "sorted"):
        y, m = moe_scaled(x, logits, router="switch", cf=1.0, dispatch=dispatch)
        xs = np.asarray(x[0])
        expected = np.stack([probs[0][0] * 1 * xs[0], np.zeros(3), probs[2][1] * 2 * xs[2],
                             probs[3][0] * 1 * xs[3]])
        np.testing.assert_allclose(y[0], expected, rtol=1e-6, atol=1e-6, err_msg=dispatch)
        f = [3 / 4, 1 / 4]                                       # fraction of tokens with top-1 e
        P = [sum(p[e] for p in probs) / 4 for e in range(2)]     # mean router probability of e
        aux = 2 * (f[0] * P[0] + f[1] * P[1])
        z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in SWITCH_LOGITS) / 4
        np.testing.assert_allclose(m["aux_loss"], aux, rtol=1e-6)
        np.testing.assert_allclose(m["z_loss"], z, rtol=1e-6)
        np.testing.assert_allclose(m["dropped_fraction"], 0.25)
        np.testing.assert_allclose(m["unrouted_fraction"], 0.25)
        np.testing.assert_allclose(m["expert_load"], [2 / 2, 1 / 2])


def test_switch_hand_case_with_room_keeps_everyone():
    logits = jnp.asarray([SWITCH_LOGITS], jnp.float32)
    x = jnp.ones((1, 4, 2), jnp.float32)
    _, m = moe_scaled(x, logits, router="switch", cf=1.5)  # C = 3
    np.testing.assert_allclose(m["dropped_fraction"], 0.0)
    np.testing.assert_allclose(m["expert_load"], [3 / 3, 1 / 3])


# (first choice, second choice) per token: (0,1) (1,0) (0,2) (0,1); capacity factor 1: budgets
# ceil(2·(p + 1)/3) = 1, 2, 2, 3 after p + 1 tokens, row buffer C = ceil(1·4·2/3) = 3.
TOP2_LOGITS = [[3.0, 1.0, 0.0], [1.0, 3.0, 0.0], [3.0, 0.0, 1.0], [3.0, 1.0, 0.0]]


def test_top2_causal_drop_order():
    """Expert 0 is chosen by every token (first choice of tokens 0, 2, 3; second of token 1). Slots go in
    token order: tokens 0 and 1 fill expert 0's budget of 2 after three tokens, so token 2's first choice
    is dropped; by token 3 the budget is 3 and it is kept. (GShard's choice-major order with a fixed
    budget of 3 would instead drop token 1's second choice in favour of token 3's first: a later token
    evicting an earlier one.)"""
    logits = jnp.asarray([TOP2_LOGITS], jnp.float32)
    r = route_jit(logits, router="topk", k=2, capacity_factor=1.0)
    np.testing.assert_array_equal(r.expert[0], [[0, 1], [1, 0], [0, 2], [0, 1]])
    np.testing.assert_array_equal(r.position[0], [[0, 0], [1, 1], [3, 0], [2, 2]])
    np.testing.assert_array_equal(r.kept[0], [[True, True], [True, True], [False, True], [True, True]])
    # gates renormalised over the two chosen experts: the third logit does not enter
    hi, lo = math.exp(3) / (math.exp(3) + math.exp(1)), math.exp(1) / (math.exp(3) + math.exp(1))
    np.testing.assert_allclose(r.gate[0], [[hi, lo], [hi, lo], [0.0, lo], [hi, lo]], rtol=1e-6)


def test_top2_hand_case_output_and_metrics():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 3)), jnp.float32)
    logits = jnp.asarray([TOP2_LOGITS], jnp.float32)
    hi, lo = math.exp(3) / (math.exp(3) + math.exp(1)), math.exp(1) / (math.exp(3) + math.exp(1))
    xs = np.asarray(x[0])
    expected = np.stack([(hi * 1 + lo * 2) * xs[0], (hi * 2 + lo * 1) * xs[1], lo * 3 * xs[2],
                         (hi * 1 + lo * 2) * xs[3]])
    for dispatch in ("dense", "sorted"):
        y, m = moe_scaled(x, logits, router="topk", k=2, dispatch=dispatch)
        np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-6, err_msg=dispatch)
        np.testing.assert_allclose(m["dropped_fraction"], 1 / 8)
        np.testing.assert_allclose(m["unrouted_fraction"], 0.0)
        np.testing.assert_allclose(m["expert_load"], [3 / 3, 3 / 3, 1 / 3])


# Per expert, the two tokens with the highest probability (C = ceil(1.5·4·1/3) = 2):
#   e0: t1 (0.574), t0 (0.488);  e1: t0 (0.488), t2 (0.452);  e2: t2 (0.452), t1 (0.348).
# Token 3 (1/3 everywhere) is third for every expert: nobody takes it.
EC_LOGITS = [[3.0, 3.0, 0.0], [2.0, 0.0, 1.5], [0.0, 1.5, 1.5], [0.0, 0.0, 0.0]]


def test_expert_choice_hand_case():
    p = np.exp(EC_LOGITS) / np.exp(EC_LOGITS).sum(1, keepdims=True)
    assert p[1, 0] > p[0, 0] > p[3, 0] and p[0, 1] > p[2, 1] > p[3, 1] and p[2, 2] > p[1, 2] > p[3, 2]
    logits = jnp.asarray([EC_LOGITS], jnp.float32)
    r = route_jit(logits, router="expert_choice", k=1, capacity_factor=1.5)     # C = ceil(1.5·4/3) = 2
    np.testing.assert_array_equal(r.position[0], [[1, 0, 2], [0, 2, 1], [2, 1, 0], [2, 2, 2]])
    np.testing.assert_allclose(r.gate[0], np.where(np.asarray(r.kept[0]), p, 0.0), rtol=1e-6)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 3)), jnp.float32)
    xs = np.asarray(x[0])
    expected = np.stack([(p[0, 0] * 1 + p[0, 1] * 2) * xs[0], (p[1, 0] * 1 + p[1, 2] * 3) * xs[1],
                         (p[2, 1] * 2 + p[2, 2] * 3) * xs[2], np.zeros(3)])
    for dispatch in ("dense", "sorted"):
        y, m = moe_scaled(x, logits, router="expert_choice", cf=1.5, dispatch=dispatch)
        np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-6, err_msg=dispatch)
        np.testing.assert_allclose(m["dropped_fraction"], 0.25)   # token 3
        np.testing.assert_allclose(m["unrouted_fraction"], 0.25)
        np.testing.assert_allclose(m["expert_load"], [1.0, 1.0, 1.0])


def test_aux_loss_uniform_router_is_one_and_collapsed_router_is_n_experts():
    losses = jax.jit(lambda lg: (load_balancing_loss(lg), router_z_loss(lg)), **FAST)
    uniform = jnp.zeros((2, 6, 4))
    # argmax ties all go to expert 0: f = (1, 0, 0, 0), P = 1/4 each -> 4 · (1 · 1/4) = 1
    np.testing.assert_allclose(losses(uniform)[0], 1.0, rtol=1e-6)
    collapsed = jnp.zeros((1, 5, 4)).at[..., 2].set(50.0)         # every token sure of expert 2
    np.testing.assert_allclose(losses(collapsed)[0], 4.0, rtol=1e-6)
    np.testing.assert_allclose(losses(uniform)[1], math.log(4) ** 2, rtol=1e-6)


def test_router_jitter():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 7)), jnp.float32)
    key = jax.random.PRNGKey(0)
    jitter = jax.jit(router_jitter, static_argnames="eps", **FAST)
    j = jitter(x, key, eps=0.1)
    ratio = np.asarray(j) / np.asarray(x)
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.03
    np.testing.assert_array_equal(jitter(x, key, eps=0.1), j)                # same key, same noise
    assert not np.array_equal(jitter(x, jax.random.PRNGKey(1), eps=0.1), j)
    assert router_jitter(x, key, 0.0) is x
    with pytest.raises(ValueError, match="eps"):
        router_jitter(x, key, 1.0)


# ------------------------------------------------------------------------------ independent numpy loop

def numpy_moe(x, logits, w_in, w_out, router, k, cf):
    """Token-by-token reference: softmax, choices, the causal capacity (token by token, an expert keeps an
    assignment while it has kept fewer than ceil(cf·(p+1)·k/E) of the first p+1 tokens; or expert choice
    with C = ceil(cf·t·k/E)), ReLU FFN experts."""
    x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
    g, t, _ = x.shape
    n_exp = logits.shape[-1]
    w_in, w_out = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
    ffn = lambda e, v: np.maximum(v @ w_in[e], 0.0) @ w_out[e]
    y = np.zeros((g, t, w_out.shape[-1]))
    for gi in range(g):
        p = np.exp(logits[gi] - logits[gi].max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if router == "expert_choice":
            for e in range(n_exp):
                for tok in np.argsort(-p[:, e], kind="stable")[:capacity_by_hand(t, n_exp, k, cf)]:
                    y[gi, tok] += p[tok, e] * ffn(e, x[gi, tok])
            continue
        choices = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        gates = np.take_along_axis(p, choices, -1)
        if k > 1:
            gates = gates / gates.sum(-1, keepdims=True)
        used = np.zeros(n_exp, int)
        for tok in range(t):                # token by token; within a token, first choice first
            for j in range(k):
                e = choices[tok, j]
                if used[e] < max(1, math.ceil(round(cf * (tok + 1) * k / n_exp, 9))):
                    used[e] += 1
                    y[gi, tok] += gates[tok, j] * ffn(e, x[gi, tok])
    return y


def random_case(seed, g, t, d, n_exp, f, dtype=np.float32):
    rng = np.random.default_rng(seed)
    arrs = (rng.normal(size=(g, t, d)), rng.normal(size=(g, t, n_exp)) * 1.5,
            rng.normal(size=(n_exp, d, f)) / math.sqrt(d), rng.normal(size=(n_exp, f, d)) / math.sqrt(f))
    return tuple(jnp.asarray(a, dtype) for a in arrs)


CASES = [  # seed, (g, t, d, E, f), router, k, capacity factor
    (1, (3, 16, 4, 8, 3), "switch", 1, 0.5),
    (2, (2, 11, 6, 5, 4), "topk", 2, 0.8),
    (3, (1, 13, 3, 6, 5), "topk", 3, 0.6),
    (6, (3, 7, 4, 3, 5), "expert_choice", 1, 0.5),
]


def capacity_by_hand(t, n_exp, k, cf):
    return max(1, min(t, math.ceil(round(cf * t * k / n_exp, 9))))


@pytest.mark.parametrize("router, k, dispatch", [("switch", 1, "dense"), ("topk", 2, "sorted"), ("topk", 3, "dense"),
                                                ("expert_choice", 1, "sorted")])
def test_large_capacity_drops_nothing_and_equals_per_token_dense(router, k, dispatch):
    """With C = t nothing is dropped: y_t = Σ_{chosen e} gate_e · FFN_e(x_t) (expert choice: all experts)."""
    g, t, d, n_exp, f = 2, 8, 4, 4, 5
    x, logits, w_in, w_out = random_case(11, g, t, d, n_exp, f)
    cf = n_exp / k                                               # C = ceil(cf · t · k / E) = t
    y, m = moe_ffn(x, logits, w_in, w_out, router=router, k=k, cf=cf, dispatch=dispatch)
    assert float(m["dropped_fraction"]) == 0.0 and float(m["unrouted_fraction"]) == 0.0
    xs, ls = np.asarray(x, np.float64), np.asarray(logits, np.float64)
    wi, wo = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
    ref = np.zeros((g, t, d))
    for gi in range(g):
        for tok in range(t):
            p = np.exp(ls[gi, tok]) / np.exp(ls[gi, tok]).sum()
            chosen = np.arange(n_exp) if router == "expert_choice" else np.argsort(-p)[:k]
            gate = p[chosen] / p[chosen].sum() if router == "topk" and k > 1 else p[chosen]
            for e, gw in zip(chosen, gate):
                ref[gi, tok] += gw * (np.maximum(xs[gi, tok] @ wi[e], 0) @ wo[e])
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------ dense == sorted, grads

@pytest.mark.parametrize("seed, shape, router, k, cf", CASES)
def test_dense_and_sorted_match_numpy_loop_and_agree_in_gradients(seed, shape, router, k, cf):
    """Both paths equal the numpy loop (dropping included), and each other in metrics and in the
    gradients w.r.t. x, logits and expert weights of a random-cotangent loss plus the aux losses."""
    g, t, d, n_exp, f = shape
    x, logits, w_in, w_out = random_case(seed, *shape)
    cot = jnp.asarray(np.random.default_rng(seed + 100).normal(size=x.shape), jnp.float32)

    @functools.partial(jax.jit, **FAST)
    def loss_and_grads(args):  # both paths in one program: one compile
        out = []
        for dispatch in ("dense", "sorted"):
            def loss(xx, lg, wi, wo):
                y, m = mixture_of_experts(xx, lg, lambda xe: expert_ffn(xe, wi, wo), router=router, k=k,
                                          capacity_factor=cf, dispatch=dispatch)
                return jnp.sum(y * cot) + 0.3 * m["aux_loss"] + 0.1 * m["z_loss"], (y, m)
            out.append(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args))
        return out

    ((_, (y_d, m_d)), g_d), ((_, (y_s, m_s)), g_s) = loss_and_grads((x, logits, w_in, w_out))
    ref = numpy_moe(x, logits, w_in, w_out, router, k, cf)
    np.testing.assert_allclose(y_d, ref, rtol=2e-5, atol=2e-5, err_msg="dense vs numpy")
    np.testing.assert_allclose(y_s, ref, rtol=2e-5, atol=2e-5, err_msg="sorted vs numpy")
    if cf < 1:
        assert float(m_d["dropped_fraction"]) > 0                # the case exercises dropping
    for key in m_d:
        np.testing.assert_allclose(m_s[key], m_d[key], rtol=1e-6, atol=1e-7, err_msg=key)
    for name, a, b in zip(("x", "logits", "w_in", "w_out"), g_s, g_d):
        assert float(jnp.abs(b).max()) > 0, name                 # the gradient is not trivially zero
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"grad {name}")


def sequential_slots(expert, valid, n_exp, cf, doc_start, capacity):
    """The causal capacity as a plain loop: documents restart the budget and the per-document count; slots
    count the row's kept assignments per expert and stop at the row buffer C."""
    t, k = expert.shape
    kept, slot = np.zeros((t, k), bool), np.full((t, k), -1)
    in_doc, row = np.zeros(n_exp, int), np.zeros(n_exp, int)
    p = -1
    for tok in range(t):
        if doc_start[tok]:
            in_doc[:], p = 0, -1
        if valid[tok, 0]:
            p += 1
        budget = max(1, math.ceil(round(cf * (max(p, 0) + 1) * k / n_exp, 9)))
        for j in range(k):
            e = expert[tok, j]
            if valid[tok, j] and in_doc[e] < budget and row[e] < capacity:
                kept[tok, j], slot[tok, j] = True, row[e]
                in_doc[e] += 1
                row[e] += 1
    return kept, slot


@pytest.mark.parametrize("t, k, n_exp, cf", [(1, 1, 4, 1.0), (29, 3, 7, 0.6), (40, 1, 4, 0.5), (33, 2, 5, 1.3)])
def test_causal_slots_match_a_sequential_loop(t, k, n_exp, cf):
    """The closed form (cumsum + segmented running minimum) against the sequential definition, with left
    padding, inner padding and packed documents, including rows whose packed documents fill the buffer."""
    rng = np.random.default_rng(t * 10 + k)
    g = 6
    expert = np.stack([np.stack([rng.choice(n_exp, k, replace=False) for _ in range(t)]) for _ in range(g)])
    expert[1] = 0 if k == 1 else expert[1]                       # a row overloading one expert
    valid = np.ones((g, t), bool)
    valid[2, : t // 3] = False                                    # left padding
    valid[3, rng.random(t) < 0.3] = False                         # scattered padding
    doc_start = np.zeros((g, t), bool)
    doc_start[:, 0] = True
    doc_start[4, rng.random(t) < 0.2] = True                      # packed documents
    doc_start[5, ::3] = True                                      # many short documents: the buffer fills
    seq_idx = np.cumsum(doc_start, axis=1).astype(np.int32)
    from mamba_jax.ops.positions import token_positions
    doc_pos = token_positions(jnp.asarray(valid), jnp.asarray(seq_idx), None, g, t)
    valid_k = np.repeat(valid[..., None], k, axis=2)
    kept, slot = jax.jit(causal_slots, static_argnums=(2, 3), **FAST)(
        jnp.asarray(expert, jnp.int32), jnp.asarray(valid_k), n_exp, cf, jnp.asarray(doc_start), doc_pos)
    capacity = min(int(prefix_capacity(t, n_exp, k, cf)[-1]), t)
    for i in range(g):
        want_kept, want_slot = sequential_slots(expert[i], valid_k[i], n_exp, cf, doc_start[i], capacity)
        np.testing.assert_array_equal(np.asarray(kept[i]), want_kept, err_msg=f"row {i}")
        np.testing.assert_array_equal(np.where(want_kept, np.asarray(slot[i]), -1), want_slot, err_msg=f"row {i}")
    assert not np.asarray(kept).all() and np.asarray(kept).any()


@pytest.mark.parametrize("router, k, cf, dispatch", [("switch", 1, 0.75, "sorted"), ("topk", 2, 0.75, "dense"),
                                                     ("expert_choice", 1, 0.8, "sorted")])
def test_float64_check_grads(router, k, cf, dispatch):
    """Finite differences in float64 against reverse mode w.r.t. inputs, router logits and expert weights,
    with some assignments dropped (routing is piecewise constant; random inputs keep it away from ties).
    Reverse mode only: training uses it, and each extra mode is another compile."""
    with jax.enable_x64(True):
        x, logits, w_in, w_out = random_case(21, 2, 6, 3, 3, 4, dtype=np.float64)

        @jax.jit  # check_grads differentiates through it: no compiler_options on a nested jit
        def f(xx, lg, wi, wo):
            y, m = mixture_of_experts(xx, lg, lambda xe: expert_ffn(xe, wi, wo), router=router, k=k,
                                      capacity_factor=cf, dispatch=dispatch)
            return y, m["aux_loss"], m["z_loss"], m["dropped_fraction"]

        y, _, _, dropped = f(x, logits, w_in, w_out)
        assert y.dtype == jnp.float64 and float(dropped) > 0
        check_grads(f, (x, logits, w_in, w_out), order=1, modes=("rev",), eps=1e-6)


def test_router_runs_in_float32_for_bf16_inputs():
    x, logits, w_in, w_out = random_case(3, 2, 8, 4, 4, 4)
    xb, lb = x.astype(jnp.bfloat16), logits.astype(jnp.bfloat16)
    y, m = moe_ffn(xb, lb, w_in.astype(jnp.bfloat16), w_out.astype(jnp.bfloat16), router="switch")
    assert y.dtype == jnp.bfloat16
    assert m["aux_loss"].dtype == jnp.float32 and m["z_loss"].dtype == jnp.float32
    r = route_jit(lb, router="topk", k=2, capacity_factor=1.0)
    assert r.gate.dtype == jnp.float32


# ----------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs, match", [
    (dict(router="top1"), "router"),
    (dict(router="topk", k=5), "k"),
    (dict(router="topk", k=0), "k"),
    (dict(router="switch", k=2), "k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(dispatch="ragged"), "dispatch"),
])
def test_bad_arguments(kwargs, match):
    x, logits, w_in, w_out = random_case(0, 1, 4, 3, 4, 2)
    with pytest.raises(ValueError, match=match):
        mixture_of_experts(x, logits, lambda xe: expert_ffn(xe, w_in, w_out), **kwargs)


def test_bad_shapes():
    x, logits, w_in, w_out = random_case(0, 1, 4, 3, 4, 2)
    with pytest.raises(ValueError, match="logits"):
        mixture_of_experts(x, logits[:, :3], lambda xe: xe)
    with pytest.raises(ValueError, match="`x`"):
        mixture_of_experts(x[0], logits, lambda xe: xe)
