"""The LTI ablation (`MambaConfig(selective=False)`, the Mamba paper's "S4" arm of its selective-copying
table): Δ, B and C do not depend on the input — their gradient w.r.t. the layer input is zero, where the
selective layer's is not — and decoding still equals the forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mamba_jax.layers.mamba as mamba_layer
from mamba_jax.inference import prefill, step
from mamba_jax.layers import MambaConfig
from mamba_jax.layers.mamba import MambaMixer
from mamba_jax.models import MambaLM, init_params


def _scan_inputs_gradient(selective: bool, monkeypatch) -> float:
    """max |d(Δ, B, C)/dx|, read through a scan replaced by y = Δ + ΣB + ΣC (out_proj is linear)."""
    def scan_of_inputs(x_conv, delta, A, B, C, **kw):
        y = delta + B.sum(-1, keepdims=True) + C.sum(-1, keepdims=True)
        return y.astype(x_conv.dtype), jnp.zeros((x_conv.shape[0], x_conv.shape[-1], A.shape[-1]))

    monkeypatch.setattr(mamba_layer, "selective_scan_on_mesh", scan_of_inputs)
    cfg = MambaConfig(vocab_size=8, d_model=8, n_layer=1, d_state=4, selective=selective)
    mixer = MambaMixer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    params = mixer.init(jax.random.PRNGKey(1), x)
    grad = jax.grad(lambda x: jnp.sum(mixer.apply(params, x)[0] ** 2))(x)
    return float(jnp.max(jnp.abs(grad)))


def test_lti_delta_b_c_do_not_depend_on_the_input(monkeypatch):
    assert _scan_inputs_gradient(False, monkeypatch) == 0.0
    assert _scan_inputs_gradient(True, monkeypatch) > 1e-3          # the selective layer's do: the check can fail


def test_lti_parameters_and_decoding():
    cfg = MambaConfig(vocab_size=16, d_model=16, n_layer=2, d_state=4, selective=False)
    model = MambaLM(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    mixer = params["layers_0"]["mixer"]
    assert {"B", "C", "dt_proj_bias"} <= set(mixer) and not {"x_proj", "dt_proj_kernel"} & set(mixer)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 16)
    full = model.apply({"params": params}, ids)
    logits, cache = prefill(model, params, ids[:, :5])
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 9):
        out, cache = step(model, params, ids[:, t], cache)
        np.testing.assert_allclose(out, full[:, t], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="selective"):
        MambaConfig(selective=False, bc_source="input")
