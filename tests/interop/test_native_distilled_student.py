"""A distilled hybrid student (attention → Mamba-2, with the in/out projection biases its open-gate init
adds) goes through our own checkpoint format and comes back the same model: config fields (bias, the
Mamba positions) and every parameter, hence the same logits. Hybrids have no HF layout; `save_hf`
refuses them with a message naming `save_pretrained`."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from mamba_jax.distill.attention_init import attention_to_mamba2
from mamba_jax.interop import load_pretrained, save_hf, save_pretrained
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.models import TransformerLM, init_params
from mamba_jax.models.hybrid import HybridLM

TEACHER = TransformerConfig(vocab_size=40, d_model=32, n_layer=4, n_heads=4, n_kv_heads=2, d_intermediate=48)


def test_distilled_student_round_trips_through_save_pretrained(tmp_path):
    teacher_params = init_params(TransformerLM(TEACHER), jax.random.PRNGKey(0))
    config, params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[1, 3])
    student = HybridLM(config)
    assert config.mamba2.bias  # the open-gate init gives the Mamba-2 mixers in/out projection biases
    assert np.any(np.asarray(params["layers_1"]["mixer"]["in_proj_zx"]["bias"]) != 0)   # the open gate
    save_pretrained(student, params, tmp_path)
    model, loaded = load_pretrained(tmp_path)
    assert isinstance(model, HybridLM) and model.config == config and model.config.mamba2.bias
    flat = jax.tree_util.tree_leaves_with_path(params)
    flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
    assert len(flat) == len(flat_loaded)
    for path, value in flat:
        np.testing.assert_array_equal(np.asarray(flat_loaded[path]), np.asarray(value), err_msg=str(path))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, TEACHER.vocab_size)
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)({"params": loaded}, tokens)),
                                  np.asarray(jax.jit(student.apply)({"params": params}, tokens)))
    with pytest.raises(ValueError, match="save_pretrained"):
        save_hf(student, params, tmp_path / "hf")


def test_mamba1_form_student_round_trips_and_has_no_hf_layout(tmp_path):
    from mamba_jax.distill import attention_to_mamba1
    from mamba_jax.layers.mamba import MambaConfig
    from mamba_jax.models import MambaLM

    teacher_params = init_params(TransformerLM(TEACHER), jax.random.PRNGKey(0))
    config, params = attention_to_mamba1(TEACHER, teacher_params, jax.random.PRNGKey(1), fraction=0.5,
                                         d_state=8)
    student = HybridLM(config)
    save_pretrained(student, params, tmp_path / "native")
    model, loaded = load_pretrained(tmp_path / "native")
    assert model.config == config and model.config.mamba.bc_source == "input"
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, TEACHER.vocab_size)
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)({"params": loaded}, tokens)),
                                  np.asarray(jax.jit(student.apply)({"params": params}, tokens)))
    # a pure Mamba-1 LM of that form has no MambaForCausalLM layout (no x_proj): save_hf names the way out
    lm_cfg = MambaConfig(vocab_size=40, d_model=32, n_layer=1, d_state=8, bc_source="input", d_xb=32)
    lm = MambaLM(lm_cfg)
    with pytest.raises(ValueError, match="bc_source='input'.*save_pretrained"):
        save_hf(lm, init_params(lm, jax.random.PRNGKey(3)), tmp_path / "hf")
