"""InContextRegressor: read at the x tokens, causal in the prompt, per-layer predictions for probing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.models import DecoderLM, HybridConfig, Mamba2Config, MambaConfig, TransformerConfig
from mamba_jax.models.icl import InContextRegressor

CONFIGS = {
    "mamba": MambaConfig(d_model=32, n_layer=2, d_state=4),
    "mamba2": Mamba2Config(d_model=32, n_layer=2, d_state=8, head_dim=16, chunk_size=4),
    "transformer": TransformerConfig(d_model=32, n_layer=2, n_heads=4, d_intermediate=64, position_embedding="none"),
    "hybrid": HybridConfig(pattern="M A", d_model=32, mamba=MambaConfig(d_state=4),
                           attention=TransformerConfig(n_heads=4, d_intermediate=64, position_embedding="none")),
}


def _prompt(key, b=2, n=7, d=5):
    kx, ky = jax.random.split(jax.random.PRNGKey(key))
    return jax.random.normal(kx, (b, n, d)), jax.random.normal(ky, (b, n))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_params(request):
    model = InContextRegressor(CONFIGS[request.param])
    xs, ys = _prompt(0)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), xs, ys)["params"])
    return model, params


def test_predictions_are_causal_in_the_prompt(model_and_params):
    """Prediction i may depend on x_1..x_i and y_1..y_{i-1} only: changing y_i or x_{i+1} leaves
    predictions 0..i unchanged and changes later ones."""
    model, params = model_and_params
    apply = jax.jit(model.apply)
    xs, ys = _prompt(2)
    base = apply({"params": params}, xs, ys)
    assert base.shape == (2, 7) and base.dtype == jnp.float32
    i = 3
    changed_y = apply({"params": params}, xs, ys.at[:, i].add(5.0))
    np.testing.assert_allclose(changed_y[:, :i + 1], base[:, :i + 1], atol=1e-5)
    assert np.abs(changed_y[:, i + 1:] - base[:, i + 1:]).max() > 1e-4
    changed_x = apply({"params": params}, xs.at[:, i + 1].add(3.0), ys)
    np.testing.assert_allclose(changed_x[:, :i + 1], base[:, :i + 1], atol=1e-5)
    assert np.abs(changed_x[:, i + 1] - base[:, i + 1]).max() > 1e-4


def test_layer_predictions_end_with_the_predictions(model_and_params):
    model, params = model_and_params
    xs, ys = _prompt(3)
    preds, layers = model.apply({"params": params}, xs, ys, return_layer_predictions=True)
    assert layers.shape == (model.config.n_layer + 1, 2, 7)
    np.testing.assert_array_equal(layers[-1], preds)
    np.testing.assert_allclose(preds, model.apply({"params": params}, xs, ys), atol=1e-6)
    # before any layer mixes tokens, the prediction at x_i sees x_i alone: earlier labels do not move it
    _, moved = model.apply({"params": params}, xs, ys.at[:, 2].add(5.0), return_layer_predictions=True)
    np.testing.assert_allclose(moved[0], layers[0], atol=1e-6)
    assert np.abs(moved[-1][:, 3:] - layers[-1][:, 3:]).max() > 1e-4


def test_no_token_embeddings_or_lm_head(model_and_params):
    _, params = model_and_params
    assert set(params) == {"read_in", "backbone", "norm_f", "read_out"}
    assert "embeddings" not in params["backbone"] and "norm_f" not in params["backbone"]


def test_bad_inputs_are_named():
    model = InContextRegressor(CONFIGS["mamba"])
    xs, ys = _prompt(4)
    with pytest.raises(ValueError, match=r"`ys` must have shape \(2, 7\)"):
        model.init(jax.random.PRNGKey(0), xs, ys[:, :6])
    with pytest.raises(ValueError, match="head=False has no token embeddings"):
        DecoderLM(CONFIGS["mamba"], head=False).init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))


@pytest.mark.parametrize("name", ["transformer", "hybrid"])
def test_save_and_load_pretrained_round_trip(name, tmp_path):
    from mamba_jax.interop import load_hf, load_pretrained, save_pretrained

    model = InContextRegressor(CONFIGS[name])
    xs, ys = _prompt(3)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(4), xs, ys)["params"])
    save_pretrained(model, params, tmp_path)
    for loader in (load_pretrained, load_hf):
        loaded, loaded_params = loader(tmp_path)
        assert isinstance(loaded, InContextRegressor) and loaded.config == model.config
        np.testing.assert_array_equal(loaded.apply({"params": loaded_params}, xs, ys),
                                      model.apply({"params": params}, xs, ys))


def test_save_pretrained_rejects_foreign_params(tmp_path):
    from mamba_jax.interop import save_pretrained

    model = InContextRegressor(CONFIGS["mamba"])
    xs, ys = _prompt(5)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), xs, ys)["params"])
    with pytest.raises(ValueError, match="read_in"):
        save_pretrained(model, {"backbone": params["backbone"]}, tmp_path)
    other = nn.meta.unbox(InContextRegressor(CONFIGS["mamba2"]).init(jax.random.PRNGKey(0), xs, ys)["params"])
    with pytest.raises(ValueError, match="parameter"):
        save_pretrained(model, other, tmp_path)
