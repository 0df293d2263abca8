"""Named Mamba sizes: parameter counts match the names of the released checkpoints (abstract init only)."""
import math

import jax
import jax.numpy as jnp
import pytest

from mamba_jax.models import MAMBA_SIZES, MambaLM, mamba_config

NOMINAL = {"130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9, "2.8b": 2.8e9}


def _param_count(config):
    model = MambaLM(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("size", sorted(MAMBA_SIZES))
def test_named_sizes_have_their_nominal_parameter_counts(size):
    config = mamba_config(size)
    assert config.padded_vocab_size == 50280 and config.d_state == 16 and config.tie_embeddings
    count = _param_count(config)
    # the names round the counts of the released checkpoints (e.g. 129.1M for "130m", 1.37B for "1.4b")
    assert abs(count - NOMINAL[size]) / NOMINAL[size] < 0.04, count


def test_overrides_and_errors():
    config = mamba_config("130m", vocab_size=256, n_layer=2)
    assert (config.vocab_size, config.n_layer, config.d_model) == (256, 2, 768)
    with pytest.raises(ValueError, match="`size`"):
        mamba_config("7b")
