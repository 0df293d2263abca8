"""MoE-Mamba training with router jitter (the train step's per-step "jitter" rng: different steps draw
different noise, the same step the same noise, jitter 0 ignores the rng, evaluation never jitters) and
left padding kept out of routing (the model's `mask` reaches the MoE layers: same logits at the real
positions as without the padding, same router losses and metrics)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.models import init_params
from mamba_jax.models.hybrid import HybridLM
from mamba_jax.models.moe_mamba import moe_mamba_config
from mamba_jax.train import create_train_state, make_eval_step, make_train_step, step_rng

KW = dict(vocab_size=32, d_model=16, n_blocks=1, n_experts=4, d_state=4)


def _batch(seed=0, b=2, l=8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 32, (b, l + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, l), bool)}


@pytest.fixture(scope="module")
def params():
    return init_params(HybridLM(moe_mamba_config(**KW)), jax.random.PRNGKey(0))


def _state(model, params, step=0):
    state = create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), optax.sgd(0.1))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_jitter_uses_a_fresh_deterministic_rng_per_step(params):
    model = HybridLM(moe_mamba_config(jitter=0.5, **KW))
    batch = _batch()
    step = make_train_step(donate=False, rng=3)
    s0, m0 = step(_state(model, params, 0), batch)
    s0b, m0b = step(_state(model, params, 0), batch)                  # same step: same key, same noise
    s1, m1 = step(_state(model, params, 1), batch)                    # next step: another key
    assert float(m0["loss"]) == float(m0b["loss"]) and float(m0["router_loss"]) == float(m0b["router_loss"])
    for a, b in zip(_leaves(s0.params), _leaves(s0b.params)):
        np.testing.assert_array_equal(a, b)
    assert float(m0["loss"]) != float(m1["loss"]) and float(m0["router_loss"]) != float(m1["router_loss"])
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(s0.params), _leaves(s1.params)))
    # the key of a step is fold_in(seed key, step): an explicit key gives the same keys as its seed
    np.testing.assert_array_equal(step_rng(jax.random.PRNGKey(3), 0), step_rng(3, 0))
    np.testing.assert_array_equal(step_rng(3, 1), jax.random.fold_in(jax.random.PRNGKey(3), 1))
    assert not np.array_equal(step_rng(3, 0), step_rng(3, 1))
    # evaluation never jitters: same as the model without jitter, and needs no rng
    plain = HybridLM(moe_mamba_config(**KW))
    got = make_eval_step(model.apply)(params, batch)
    want = make_eval_step(plain.apply)(params, batch)
    assert float(got["nll_sum"]) == float(want["nll_sum"])


def test_jitter_zero_ignores_the_rng(params):
    model = HybridLM(moe_mamba_config(**KW))                           # jitter 0 (the default)
    batch = _batch(1)
    s_none, m_none = make_train_step(donate=False)(_state(model, params, 0), batch)
    with_rng = make_train_step(donate=False, rng=5)
    s_a, m_a = with_rng(_state(model, params, 0), batch)
    s_b, m_b = with_rng(_state(model, params, 1), batch)
    for m in (m_a, m_b):
        assert float(m["loss"]) == float(m_none["loss"]) and float(m["router_loss"]) == float(m_none["router_loss"])
    for a, b, c in zip(_leaves(s_none.params), _leaves(s_a.params), _leaves(s_b.params)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_jitter_without_an_rng_fails_naming_it(params):
    model = HybridLM(moe_mamba_config(jitter=0.1, **KW))
    with pytest.raises(Exception, match="jitter"):
        make_train_step(donate=False)(_state(model, params, 0), _batch())
    with pytest.raises(ValueError, match="make_train_step: `rng`"):
        make_train_step(rng="seed")


@pytest.mark.parametrize("parallel", [False, True])
def test_left_padding_gives_the_logits_and_router_losses_of_the_unpadded_rows(parallel):
    """Rows left-padded with 5 pad tokens (token ids 7 and 0: the pad value is free) give, at their real
    positions, the logits of the real tokens alone (eval mode, dropless; and train mode with a capacity
    that binds: the causal budget counts real tokens only), and the same router losses and MoE metrics."""
    config = moe_mamba_config(capacity_factor=0.5, parallel=parallel, **KW)
    model = HybridLM(config)
    p = init_params(model, jax.random.PRNGKey(1))
    real = np.random.default_rng(2).integers(1, 32, (2, 6)).astype(np.int32)
    l = 11
    ids = np.zeros((2, l), np.int32)
    ids[0, :l - 6] = 7
    ids[:, l - 6:] = real
    mask = (np.arange(l) >= l - 6)[None, :].repeat(2, 0).astype(np.int32)

    apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask=mask))
    train = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask=mask, mutable=["losses", "moe_metrics"],
                                                     deterministic=False))
    want = apply(p, jnp.asarray(real), None)
    got = apply(p, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got[:, l - 6:], want, rtol=1e-5, atol=1e-5)
    got_t, got_sown = train(p, jnp.asarray(ids), jnp.asarray(mask))
    want_t, want_sown = train(p, jnp.asarray(real), None)
    np.testing.assert_allclose(got_t[:, l - 6:], want_t, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_sown), jax.tree_util.tree_leaves(want_sown)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    dropped = [float(v) for path, v in jax.tree_util.tree_leaves_with_path(want_sown)
               if "dropped_fraction" in jax.tree_util.keystr(path)]
    assert max(dropped) > 0                                # the capacity binds in training


def test_token_mask_shape_is_checked():
    from mamba_jax.layers.moe import MoE, MoEConfig
    layer = MoE(MoEConfig(n_experts=2))
    x = jnp.ones((2, 4, 8))
    variables = layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"MoE: `token_mask` must have shape \(b, l\) = \(2, 4\)"):
        layer.apply(variables, x, token_mask=jnp.ones((2, 5)))


def test_sharded_training_passes_the_jitter_rng(params):
    """`sharded_training(..., rng=seed)` (one-device mesh) takes the same jittered step as
    `make_train_step(rng=seed)`; without an rng a jittered model cannot train there either."""
    from mamba_jax.sharding import MeshConfig, make_mesh_from_config
    from mamba_jax.train import sharded_training

    model = HybridLM(moe_mamba_config(jitter=0.5, **KW))
    batch, tx = _batch(), optax.sgd(0.1)
    state0 = lambda: create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), tx)  # noqa: E731
    want_state, want = make_train_step(donate=False, rng=3)(state0(), batch)
    tr = sharded_training(model, tx, make_mesh_from_config(MeshConfig()), "dp", rng=3, donate=False)
    got_state, got = tr.train_step(tr.shard_state(state0()), batch)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
    for a, b in zip(_leaves(got_state.params), _leaves(want_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    tr_no_rng = sharded_training(model, tx, make_mesh_from_config(MeshConfig()), "dp", donate=False)
    with pytest.raises(Exception, match="jitter"):
        tr_no_rng.train_step(tr_no_rng.shard_state(state0()), batch)
