"""`remat=True` recomputes each block in the backward pass (`nn.remat`): same parameter tree, values and
gradients as without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.models import HybridConfig, MambaConfig, MambaLM, TransformerConfig, HybridLM, init_params


def _loss(model):
    def loss(params, ids):
        return jnp.mean(model.apply({"params": params}, ids) ** 2)
    return loss


@pytest.mark.parametrize("make", [
    lambda remat: MambaLM(MambaConfig(vocab_size=32, d_model=32, n_layer=4, d_state=8, remat=remat)),
    lambda remat: HybridLM(HybridConfig(pattern="M A", vocab_size=32, d_model=32, remat=remat,
                                        mamba=MambaConfig(d_state=4),
                                        attention=TransformerConfig(n_heads=4, d_intermediate=64))),
])
def test_remat_keeps_values_and_gradients(make):
    plain, remat = make(False), make(True)
    params = init_params(plain, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 32)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init_params(remat, jax.random.PRNGKey(0)))
    forward = lambda model: jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    np.testing.assert_allclose(forward(remat), forward(plain), rtol=1e-6, atol=1e-6)
    g_plain = jax.jit(jax.grad(_loss(plain)))(params, ids)
    g_remat = jax.jit(jax.grad(_loss(remat)))(params, ids)
    for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
