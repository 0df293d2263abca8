"""MoE-Mamba as the hybrid pattern "M E M E": the MoE layers' router losses join the training objective
(checked against the loss written out by hand), train vs eval capacity, grad accumulation, parameter
counts against the shapes; the parallel block's mixer against the two sublayers applied by hand."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.layers.mamba import MambaMixer, init_layer_cache
from mamba_jax.layers.moe import MoEConfig, MoEMixer
from mamba_jax.models import init_params
from mamba_jax.models.hybrid import HybridLM, parse_pattern
from mamba_jax.models.moe_mamba import ParallelMambaMoE, mamba_baseline_config, moe_mamba_config, parameter_counts
from mamba_jax.train import create_train_state, make_train_step
from mamba_jax.train.step import masked_token_stats

CONFIG = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=2, n_experts=4, capacity_factor=1.0, d_state=4)


@pytest.fixture(scope="module")
def model_and_params():
    model = HybridLM(CONFIG)
    return model, init_params(model, jax.random.PRNGKey(0))


def _batch(seed=0, b=4, l=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 32, (b, l + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, l), bool)}


def test_pattern_and_configs():
    assert CONFIG.layer_kinds == ("M", "E", "M", "E") and parse_pattern("ME M2E") == ("M", "E", "M2", "E")
    moe = CONFIG.mixer_config("E").moe
    assert (moe.n_experts, moe.router, moe.top_k, moe.capacity_factor_train, moe.aux_loss_coef) == (4, "switch", 1, 1.0, 0.01)
    assert moe.expert_width(16) == 48                                  # d_expert = 3 · d_model
    paper = moe_mamba_config("100m", vocab_size=50_000)
    assert (paper.d_model, len(paper.layer_kinds), paper.mixer_config("E").moe.n_experts) == (768, 32, 42)
    base = mamba_baseline_config(CONFIG)
    assert (base.n_layer, base.d_model) == (4, 16)
    reference = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=1, n_experts=4, scan_impl="reference")
    assert reference.mixer_config("M").scan_impl == "reference" == mamba_baseline_config(reference).scan_impl
    with pytest.raises(ValueError, match="'E' \\(MoE feed-forward\\), 'P' \\(Mamba and MoE in parallel\\)"):
        parse_pattern("M X")
    parallel = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=2, n_experts=4, d_state=4, parallel=True)
    assert parallel.layer_kinds == ("P", "P") and mamba_baseline_config(parallel).n_layer == 4
    block = parallel.mixer_config("P")
    assert block.mamba == CONFIG.mixer_config("M").replace(n_layer=2) and block.moe == CONFIG.mixer_config("E").replace(n_layer=2)
    assert (block.d_model, block.d_intermediate, block.dtype) == (16, 0, "float32")


def test_train_step_objective_is_cross_entropy_plus_weighted_router_losses(model_and_params):
    model, params = model_and_params
    batch = _batch()

    def by_hand(p):
        logits, sown = model.apply({"params": p}, batch["inputs"], mutable=["losses", "moe_metrics"],
                                   deterministic=False)
        ce = masked_token_stats(logits, batch["targets"], batch["loss_mask"])["nll_sum"] / batch["loss_mask"].sum()
        aux = sum(sown["moe_metrics"][f"layers_{i}"]["mixer"]["aux_loss"][0] for i in (1, 3))
        drops = [sown["moe_metrics"][f"layers_{i}"]["mixer"]["dropped_fraction"][0] for i in (1, 3)]
        return ce + 0.01 * aux, (ce, aux, drops)

    (want_loss, (ce, aux, drops)), want_grads = jax.value_and_grad(by_hand, has_aux=True)(params)
    state = create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), optax.sgd(1.0))
    new_state, metrics = make_train_step(donate=False)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(ce), rel=1e-5)          # `loss` stays the token CE
    assert float(metrics["router_loss"]) == pytest.approx(0.01 * float(aux), rel=1e-5)
    assert 0.0 <= float(metrics["moe_dropped_fraction"]) < 1.0
    # each MoE layer's dropped fraction is reported too (layers 1 and 3 of "M E M E"), their mean above
    for i, drop in zip((1, 3), drops):
        assert float(metrics[f"moe_dropped_fraction_layers_{i}"]) == pytest.approx(float(drop), abs=1e-7)
    assert float(metrics["moe_dropped_fraction"]) == pytest.approx(float(sum(drops)) / 2, abs=1e-7)
    # SGD with lr 1: the update is minus the gradient of CE + 0.01 · Σ aux
    got = jax.tree_util.tree_map(lambda a, b: a - b, params, new_state.params)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6), got, want_grads)
    router = want_grads["layers_1"]["mixer"]["moe"]["router"]["kernel"]
    assert float(jnp.abs(router).max()) > 0                                      # the router learns


def test_training_uses_the_train_capacity_and_eval_is_dropless(model_and_params):
    _, params = model_and_params
    tight = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=2, n_experts=4, capacity_factor=0.25, d_state=4)
    assert tight.mixer_config("E").moe.capacity_factor_eval is None
    model = HybridLM(tight)
    inputs = _batch()["inputs"]
    collect = ["losses", "moe_metrics"]
    train_logits, train_sown = model.apply({"params": params}, inputs, mutable=collect, deterministic=False)
    eval_logits, eval_sown = model.apply({"params": params}, inputs, mutable=collect)     # deterministic: eval
    drop = lambda s: float(s["moe_metrics"]["layers_1"]["mixer"]["dropped_fraction"][0])
    # capacity ceil(0.25 · 12 / 4) = 1 slot per expert: at least 12 − 4 of 12 tokens dropped when training
    assert drop(train_sown) >= 8 / 12 - 1e-6 and drop(eval_sown) == 0.0
    # collecting the losses no longer switches the mode: the flag does
    np.testing.assert_array_equal(eval_logits, model.apply({"params": params}, inputs))
    assert float(jnp.abs(train_logits - eval_logits).max()) > 1e-3


def test_grad_accumulation_equals_the_whole_batch(model_and_params):
    model, params = model_and_params
    batch = _batch(seed=1)
    results = []
    for k in (1, 2):
        state = create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), optax.sgd(0.1))
        state, metrics = make_train_step(donate=False, grad_accum_steps=k)(state, batch)
        results.append((metrics, state.params))
    for key in ("loss", "router_loss", "moe_dropped_fraction"):
        assert float(results[0][0][key]) == pytest.approx(float(results[1][0][key]), rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           results[0][1], results[1][1])


def test_parameter_counts_from_the_shapes(model_and_params):
    _, params = model_and_params
    counts = parameter_counts(CONFIG, params)
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    expert = 2 * (4 * 16 * 48 * 2)                       # 2 MoE layers × E × (w_in + w_out)
    assert counts["total"] == total and counts["expert"] == expert
    assert counts["active"] == total - expert + expert // 4          # top-1 of 4 experts per layer
    assert counts["embedding"] == CONFIG.padded_vocab_size * 16
    assert MoEConfig(n_experts=4, router="topk").top_k == 2


def test_parallel_mixer_is_mamba_plus_moe_of_the_same_input():
    """y = Mamba(x) + MoE(x) with the block's own params, in train mode (deterministic=False: train
    capacity) and eval mode (dropless), and the Mamba cache passes through unchanged."""
    mixer = ParallelMambaMoE(CONFIG.mixer_config("P"))
    mamba, moe = MambaMixer(CONFIG.mixer_config("M")), MoEMixer(CONFIG.mixer_config("E"))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 16))
    params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.PRNGKey(2), x)["params"])
    assert set(params) == {"mamba", "moe"}
    want = jax.eval_shape(lambda: nn.meta.unbox({"mamba": mamba.init(jax.random.PRNGKey(0), x)["params"],
                                                 "moe": moe.init(jax.random.PRNGKey(0), x)["params"]}))
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(lambda s: s.shape, want)
    cache = init_layer_cache(CONFIG.mixer_config("M"), 2)
    collect = ["losses", "moe_metrics"]

    @jax.jit
    def both_ways(params, x, cache):      # one compile for every apply below
        x1 = x[:, :1]
        return {
            "block_train": mixer.apply({"params": params}, x, mutable=collect, deterministic=False),
            "block_eval": mixer.apply({"params": params}, x)[0],
            "mamba": mamba.apply({"params": params["mamba"]}, x)[0],
            "moe_train": moe.apply({"params": params["moe"]}, x, mutable=collect, deterministic=False),
            "moe_eval": moe.apply({"params": params["moe"]}, x)[0],
            # decoding one token: the Mamba layer's cache goes in and comes out as the Mamba layer gives it
            "block_step": mixer.apply({"params": params}, x1, cache=cache),
            "mamba_step": mamba.apply({"params": params["mamba"]}, x1, cache=cache),
            "moe_step": moe.apply({"params": params["moe"]}, x1)[0],
        }

    out = both_ways(params, x, cache)
    (y_train, _), sown = out["block_train"]
    (y_moe_train, _), moe_sown = out["moe_train"]
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    close(y_train, out["mamba"] + y_moe_train)
    close(out["block_eval"], out["mamba"] + out["moe_eval"])
    assert float(jnp.abs(y_moe_train).max()) > 0 and float(jnp.abs(out["mamba"]).max()) > 0     # both contribute
    assert float(sown["losses"]["moe"]["router_loss"][0]) == pytest.approx(float(moe_sown["losses"]["router_loss"][0]))
    assert float(sown["moe_metrics"]["moe"]["dropped_fraction"][0]) > 0       # 12 tokens, 3 slots/expert: drops
    (y1, new_cache), (y1_mamba, want_cache) = out["block_step"], out["mamba_step"]
    close(y1, y1_mamba + out["moe_step"])
    jax.tree_util.tree_map(close, new_cache, want_cache)


def test_parallel_model_places_both_sublayers_in_each_block_and_sows_their_router_losses(model_and_params):
    """HybridLM over "P P": every block holds a Mamba and an MoE sublayer behind one norm, both MoE layers
    sow router losses (train mode), and the parameters are the sequential "M E M E" model's less one norm
    per block."""
    config = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=2, n_experts=4, d_state=4, parallel=True)
    model = HybridLM(config)
    params = init_params(model, jax.random.PRNGKey(3))
    for i in (0, 1):
        assert set(params[f"layers_{i}"]) == {"norm", "mixer"} and set(params[f"layers_{i}"]["mixer"]) == {"mamba", "moe"}
    logits, sown = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["losses", "moe_metrics"]))(
        params, _batch()["inputs"])
    assert logits.shape == (4, 12, 32) and bool(jnp.all(jnp.isfinite(logits)))
    for i in (0, 1):
        assert float(sown["losses"][f"layers_{i}"]["mixer"]["moe"]["router_loss"][0]) > 0
    counts, sequential = parameter_counts(config, params), parameter_counts(CONFIG, model_and_params[1])
    assert counts["expert"] == sequential["expert"] == 2 * (4 * 16 * 48 * 2)
    assert counts["total"] == sequential["total"] - 2 * 16 and counts["active"] == sequential["active"] - 2 * 16
