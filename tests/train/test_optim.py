"""Weight-decay mask (exact leaves), schedules (cosine, linear), clipping, and that the mask really controls
the decay."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.models import MambaConfig, MambaLM, init_params
from mamba_jax.train import (
    OptimizerConfig,
    decays,
    learning_rate_schedule,
    make_optimizer,
    path_names,
    weight_decay_mask,
)


def _flat_mask(params):
    leaves = jax.tree_util.tree_leaves_with_path(weight_decay_mask(params))
    return {"/".join(path_names(path)): value for path, value in leaves}


@pytest.fixture(scope="module")
def params_with_bias():
    model = MambaLM(MambaConfig(vocab_size=10, d_model=16, n_layer=2, d_state=4, bias=True))
    return init_params(model, jax.random.PRNGKey(0))


def test_weight_decay_mask_names_exactly_the_right_leaves(params_with_bias):
    mask = _flat_mask(params_with_bias)
    no_decay = {name for name, value in mask.items() if not value}
    decay = {name for name, value in mask.items() if value}
    per_layer_no_decay = ["mixer/A_log", "mixer/D", "mixer/conv1d_bias", "mixer/dt_proj_bias",
                          "mixer/in_proj/bias", "mixer/out_proj/bias", "norm/weight"]
    per_layer_decay = ["mixer/conv1d_kernel", "mixer/dt_proj_kernel", "mixer/in_proj/kernel",
                       "mixer/out_proj/kernel", "mixer/x_proj/kernel"]
    assert no_decay == {f"layers_{i}/{n}" for i in range(2) for n in per_layer_no_decay} | {"norm_f/weight"}
    assert decay == {f"layers_{i}/{n}" for i in range(2) for n in per_layer_decay} | {"embeddings/embedding"}
    # same structure as the params (optax needs that)
    assert jax.tree_util.tree_structure(weight_decay_mask(params_with_bias)) == \
        jax.tree_util.tree_structure(params_with_bias)


def test_decays_rule_on_other_names():
    assert not decays(("LayerNorm_0", "scale"))
    assert not decays(("layers_3", "mixer", "dt_bias"))       # Mamba-2 naming
    assert not decays(("final_norm", "weight"))
    assert decays(("mlp", "wi", "kernel"))
    assert decays(("lm_head", "kernel"))


def test_optimizer_decays_exactly_the_masked_leaves(params_with_bias):
    """With zero gradients Adam's update is 0, so the update is only the decay -lr·wd·p."""
    lr, wd = 0.1, 0.5
    tx = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=0, total_steps=10, weight_decay=wd))
    grads = jax.tree_util.tree_map(jnp.zeros_like, params_with_bias)
    updates, _ = tx.update(grads, tx.init(params_with_bias), params_with_bias)
    mask = weight_decay_mask(params_with_bias)
    for (path, u), p, m in zip(jax.tree_util.tree_leaves_with_path(updates),
                              jax.tree_util.tree_leaves(params_with_bias), jax.tree_util.tree_leaves(mask)):
        expected = -lr * wd * np.asarray(p) if m else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-9, err_msg=jax.tree_util.keystr(path))


def test_schedule_warms_up_then_decays_to_the_end_ratio():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110,
                                                      end_lr_ratio=0.1))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)   # cosine midpoint
    assert float(schedule(110)) == pytest.approx(1e-4)


def test_linear_schedule_warms_up_then_decays_linearly_to_the_end_ratio():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110,
                                                      end_lr_ratio=0.1, lr_schedule="linear"))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(35)) == pytest.approx(1e-3 - 0.25 * 9e-4, rel=1e-5)  # straight line, not cosine
    assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(1e-4)
    assert float(schedule(500)) == pytest.approx(1e-4)
    no_warmup = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10,
                                                       end_lr_ratio=0.0, lr_schedule="linear"))
    assert [float(no_warmup(i)) for i in (0, 5, 10)] == pytest.approx([1e-3, 5e-4, 0.0])


def test_gradients_are_clipped_to_the_global_norm():
    """With b1 = b2 = 0 Adam's update is -lr·g/(|g| + eps) per coordinate; a large eps makes it depend on
    the gradient's scale, so clipping shows: g = 10 (norm 20) clipped to norm 0.5 is 0.25 per entry."""
    config = dict(learning_rate=1.0, warmup_steps=0, total_steps=2, weight_decay=0.0, b1=0.0, b2=0.0, eps=1.0)
    params = {"w": jnp.ones((4,))}
    grads = {"w": jnp.full((4,), 10.0)}
    for clip, g in ((0.5, 0.25), (100.0, 10.0)):
        tx = make_optimizer(OptimizerConfig(grad_clip_norm=clip, **config))
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(updates["w"]), np.full(4, -g / (g + 1.0)), rtol=1e-6)


@pytest.mark.parametrize("kwargs,name", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(warmup_steps=10, total_steps=10), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(end_lr_ratio=1.5), "end_lr_ratio"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(grad_clip_norm=0.0), "grad_clip_norm"),
    (dict(lr_schedule="exponential"), "lr_schedule"),
])
def test_optimizer_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OptimizerConfig(**kwargs)
