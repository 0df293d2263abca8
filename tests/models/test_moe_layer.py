"""The MoE Flax layer: parameters and logical axes, equality with a per-token numpy computation from its own
parameters, train/eval capacity, jitter, dense == sorted (values and parameter gradients), dtypes, and
config validation."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.layers import MoE, MoEConfig
from mamba_jax.sharding import EMBED, EXPERT, MLP

FAST = dict(compiler_options={"xla_backend_optimization_level": 0})  # tiny programs: compile faster
B, L, D = 2, 6, 8


def inputs(seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, D)), dtype)


def init(cfg, x):
    boxed = jax.jit(MoE(cfg).init, **FAST)(jax.random.PRNGKey(0), x)["params"]
    return boxed, nn.meta.unbox(boxed)


@functools.partial(jax.jit, static_argnames=("cfg", "deterministic"), **FAST)
def apply(cfg, params, x, deterministic=True, rng=None):
    rngs = None if rng is None else {"jitter": rng}
    return MoE(cfg).apply({"params": params}, x, deterministic=deterministic, rngs=rngs)


def test_params_shapes_axes_and_outputs():
    cfg = MoEConfig(n_experts=4, expert_bias=True, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = inputs()
    boxed, params = init(cfg, x)
    f = 3 * D                                                    # d_expert default: 3 · d_model
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes == {"router": {"kernel": (D, 4)}, "w_in": (4, D, f), "w_out": (4, f, D), "b_in": (4, f),
                      "b_out": (4, D)}
    axes = nn.get_partition_spec(boxed)
    assert tuple(axes["router"]["kernel"]) == (EMBED, None)
    assert tuple(axes["w_in"]) == (EXPERT, EMBED, MLP) and tuple(axes["w_out"]) == (EXPERT, MLP, EMBED)
    assert tuple(axes["b_in"]) == (EXPERT, MLP) and tuple(axes["b_out"]) == (EXPERT, EMBED)
    y, m = apply(cfg, params, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert set(m) == {"aux_loss", "z_loss", "router_loss", "dropped_fraction", "unrouted_fraction",
                      "expert_load"}
    assert m["expert_load"].shape == (4,)
    np.testing.assert_allclose(m["router_loss"], 0.01 * m["aux_loss"] + 0.001 * m["z_loss"], rtol=1e-6)


@pytest.mark.parametrize("router, k, dispatch", [("switch", None, "sorted"), ("topk", 2, "dense"),
                                                ("expert_choice", None, "sorted")])
def test_no_drops_equals_numpy_per_token(router, k, dispatch):
    """Eval capacity C = l (nothing dropped): y_t = Σ_e gate_e · (relu(x_t W_in[e] + b_in[e]) W_out[e] + b_out[e])
    with logits x_t · router_kernel, computed token by token in numpy from the layer's own parameters."""
    n_exp = 4
    kk = 1 if k is None else k
    cfg = MoEConfig(n_experts=n_exp, router=router, k=k, capacity_factor_eval=n_exp / kk, dispatch=dispatch,
                    d_expert=5, expert_bias=True)
    x = inputs(1)
    _, params = init(cfg, x)
    params = jax.tree_util.tree_map(  # non-zero biases so that they are tested too
        lambda a: a + 0.1 * jnp.asarray(np.random.default_rng(a.size).normal(size=a.shape), a.dtype), params)
    y, m = apply(cfg, params, x)
    assert float(m["dropped_fraction"]) == 0.0
    p = {name: np.asarray(v, np.float64) for name, v in params.items() if name != "router"}
    wr = np.asarray(params["router"]["kernel"], np.float64)
    xs = np.asarray(x, np.float64)
    ref = np.zeros(x.shape)
    for b in range(B):
        for t in range(L):
            logits = xs[b, t] @ wr
            prob = np.exp(logits - logits.max())
            prob /= prob.sum()
            chosen = np.arange(n_exp) if router == "expert_choice" else np.argsort(-prob)[:kk]
            gates = prob[chosen] / prob[chosen].sum() if kk > 1 else prob[chosen]
            for e, gate in zip(chosen, gates):
                h = np.maximum(xs[b, t] @ p["w_in"][e] + p["b_in"][e], 0.0)
                ref[b, t] += gate * (h @ p["w_out"][e] + p["b_out"][e])
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


def test_train_and_eval_capacity_factors():
    """Train: C = ceil(0.25 · 6 · 1 / 4) = 1 slot per expert: at most 4 of 6 tokens per sequence kept.
    Eval: C = 6: nothing dropped."""
    cfg = MoEConfig(n_experts=4, capacity_factor_train=0.25, capacity_factor_eval=4.0)
    x = inputs(2)
    _, params = init(cfg, x)
    _, m_train = apply(cfg, params, x, deterministic=False)
    _, m_eval = apply(cfg, params, x, deterministic=True)
    assert float(m_train["dropped_fraction"]) >= 2 / 6 - 1e-6
    assert np.all(np.asarray(m_train["expert_load"]) <= 1.0)
    assert float(m_eval["dropped_fraction"]) == 0.0
    # every token takes one of its expert's 6 slots: Σ_e count_e / C = 6 / 6
    np.testing.assert_allclose(np.asarray(m_eval["expert_load"]).sum(), 1.0, rtol=1e-6)


def test_jitter_is_train_only_and_uses_the_jitter_rng():
    cfg = MoEConfig(n_experts=4, jitter=0.5, z_loss_coef=1.0)
    x = inputs(3)
    _, params = init(cfg, x)
    _, m_eval = apply(cfg, params, x, deterministic=True)               # no rng needed
    _, m_plain = apply(cfg.replace(jitter=0.0), params, x, deterministic=False)
    np.testing.assert_allclose(m_eval["z_loss"], m_plain["z_loss"], rtol=1e-6)
    z0 = apply(cfg, params, x, deterministic=False, rng=jax.random.PRNGKey(0))[1]["z_loss"]
    z0_again = apply(cfg, params, x, deterministic=False, rng=jax.random.PRNGKey(0))[1]["z_loss"]
    z1 = apply(cfg, params, x, deterministic=False, rng=jax.random.PRNGKey(1))[1]["z_loss"]
    assert float(z0) == float(z0_again) and float(z0) != float(z1) and float(z0) != float(m_plain["z_loss"])
    with pytest.raises(Exception, match="jitter"):
        MoE(cfg).apply({"params": params}, x, deterministic=False)      # train with jitter needs the rng


def test_dense_and_sorted_layers_agree_with_parameter_gradients():
    cfg = MoEConfig(n_experts=4, router="topk", capacity_factor_train=0.5, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = inputs(4)
    _, params = init(cfg, x)
    cot = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    @functools.partial(jax.jit, **FAST)
    def both(params, x):
        out = []
        for dispatch in ("dense", "sorted"):
            def loss(p, xx):
                y, m = MoE(cfg.replace(dispatch=dispatch)).apply({"params": p}, xx, deterministic=False)
                return jnp.sum(y * cot) + m["router_loss"], m
            out.append(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x))
        return out

    ((v_d, m_d), g_d), ((v_s, m_s), g_s) = both(params, x)
    assert float(m_d["dropped_fraction"]) > 0
    np.testing.assert_allclose(v_s, v_d, rtol=1e-5)
    flat_d, flat_s = jax.tree_util.tree_leaves_with_path(g_d), jax.tree_util.tree_leaves(g_s)
    for (path, a), b in zip(flat_d, flat_s):
        assert float(jnp.abs(a).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_low_precision_experts_keep_a_float32_router():
    cfg = MoEConfig(n_experts=4, dtype="bfloat16", param_dtype="bfloat16")
    x = inputs(6, jnp.bfloat16)
    _, params = init(cfg, x)
    assert params["router"]["kernel"].dtype == jnp.float32
    assert params["w_in"].dtype == jnp.bfloat16 and params["w_out"].dtype == jnp.bfloat16
    y, m = apply(cfg, params, x)
    assert y.dtype == jnp.bfloat16 and m["aux_loss"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_default_k_and_expert_width():
    assert MoEConfig(router="switch").top_k == 1
    assert MoEConfig(router="topk").top_k == 2
    assert MoEConfig(router="topk", k=3).top_k == 3
    assert MoEConfig(router="expert_choice").top_k == 1
    assert MoEConfig().expert_width(16) == 48 and MoEConfig(d_expert=7).expert_width(16) == 7
    cfg = MoEConfig(capacity_factor_train=1.0, capacity_factor_eval=2.0)
    assert cfg.capacity_factor(deterministic=False) == 1.0 and cfg.capacity_factor(deterministic=True) == 2.0


@pytest.mark.parametrize("changes, key", [
    (dict(n_experts=0), "n_experts"),
    (dict(router="top2"), "router"),
    (dict(router="topk", k=5, n_experts=4), "k"),
    (dict(router="topk", n_experts=1), "k"),                   # default k = 2 > 1 expert
    (dict(router="switch", k=2), "k"),
    (dict(k=0), "k"),
    (dict(capacity_factor_train=0.0), "capacity_factor_train"),
    (dict(capacity_factor_eval=-1.0), "capacity_factor_eval"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(z_loss_coef=True), "z_loss_coef"),
    (dict(jitter=1.0), "jitter"),
    (dict(dispatch="ragged"), "dispatch"),
    (dict(d_expert=0), "d_expert"),
    (dict(activation="tanh"), "activation"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_configs_name_the_key(changes, key):
    with pytest.raises(ValueError, match=f"MoEConfig: `{key}`"):
        MoEConfig(**changes)


def test_bad_input_rank():
    with pytest.raises(ValueError, match=r"\(b, l, d_model\)"):
        MoE(MoEConfig(n_experts=2)).init(jax.random.PRNGKey(0), jnp.zeros((4, 8)))
