"""Initialisation is part of a model's contract: the same seed must give the same parameters from one
commit to the next (checkpoints, seeds in papers' tables and every run's reproducibility depend on it).

Flax draws each parameter's key from the order in which a module creates its parameters, so reordering two
`self.param` calls silently changes every initialisation (it happened once: the LTI change created the
dt_proj bias before its kernel). `golden_init.json` holds, per family and parameter, the shape, the mean
absolute value and the first values, written once by ``python tests/models/test_golden_init.py`` at a
reviewed commit; regenerate it only for an intended change of initialisation, and say so in the commit.
"""
import json
import os
import sys

import jax
import numpy as np
import pytest

from mamba_jax.models import Mamba2Config, MambaConfig, TransformerConfig, init_params
from mamba_jax.models.lm import DecoderLM
from mamba_jax.pytree import path_names

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_init.json")
CONFIGS = {
    "mamba": MambaConfig(vocab_size=11, d_model=16, n_layer=2, d_state=4),
    "mamba_lti": MambaConfig(vocab_size=11, d_model=16, n_layer=2, d_state=4, selective=False),
    "mamba2": Mamba2Config(vocab_size=11, d_model=16, n_layer=2, d_state=8, head_dim=8, chunk_size=8),
    "transformer": TransformerConfig(vocab_size=11, d_model=16, n_layer=2, n_heads=2, d_intermediate=32),
}
FIRST = 4  # leading values kept per parameter


def _fast_stream():
    """M2R2's fast stream over the 4-layer Transformer (rate 2, rank-4 adapters): its adapters are its own."""
    from mamba_jax.models.m2r2 import fast_stream

    return fast_stream(DecoderLM(TransformerConfig(vocab_size=11, d_model=16, n_layer=4, n_heads=2,
                                                   d_intermediate=32)), 2, rank=4)


MODELS = {"transformer_fast_stream": _fast_stream}      # families that are not a plain DecoderLM(config)


def init_summary(family: str) -> dict:
    """{parameter path: [shape, mean |value|, first values]} of the family's initialisation at seed 0."""
    model = MODELS[family]() if family in MODELS else DecoderLM(CONFIGS[family])
    params = init_params(model, jax.random.PRNGKey(0), seq_len=4)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        x = np.asarray(leaf, np.float64)
        out["/".join(path_names(path))] = [list(x.shape), float(np.abs(x).mean()), x.ravel()[:FIRST].tolist()]
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS) + sorted(MODELS))
def test_initialisation_matches_the_golden_record(family):
    with open(GOLDEN) as f:
        golden = json.load(f)[family]
    summary = init_summary(family)
    assert sorted(summary) == sorted(golden), "the parameter names changed"
    for name, (shape, mean_abs, first) in golden.items():
        got_shape, got_mean_abs, got_first = summary[name]
        assert got_shape == shape, name
        # float32 draws; the tolerance covers summation order only
        np.testing.assert_allclose(got_mean_abs, mean_abs, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_first, first, rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_check_catches_a_reordered_initialisation(monkeypatch):
    """One parameter created earlier than before (here a probe before dt_proj's kernel) shifts the keys of
    those created after it in that module: the kernel's values leave the golden record."""
    import flax.linen as nn

    import mamba_jax.layers.mamba as mamba_layer

    with open(GOLDEN) as f:
        golden = json.load(f)["mamba"]
    original = mamba_layer.logical_param

    def earlier_probe(module, name, *args):
        if name == "dt_proj_kernel":
            module.param("probe", nn.initializers.zeros, (1,))
        return original(module, name, *args)

    monkeypatch.setattr(mamba_layer, "logical_param", earlier_probe)
    summary = init_summary("mamba")
    kernel = "layers_0/mixer/dt_proj_kernel"
    assert summary[kernel][0] == golden[kernel][0]
    assert not np.allclose(summary[kernel][2], golden[kernel][2], rtol=1e-5)
    # parameters created before the probe keep their values
    np.testing.assert_allclose(summary["layers_0/mixer/conv1d_kernel"][2], golden["layers_0/mixer/conv1d_kernel"][2],
                               rtol=1e-5)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit("usage: python tests/models/test_golden_init.py  (rewrites golden_init.json)")
    with open(GOLDEN, "w") as f:
        json.dump({family: init_summary(family) for family in list(CONFIGS) + list(MODELS)}, f, indent=0)
    print(f"wrote {GOLDEN}")
