"""MambaClassifier: token layouts, shapes, the bidirectional scan, and config/input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.models import ClassifierConfig, MambaClassifier, count_params, image_tokens, init_classifier

SMALL = dict(n_classes=5, image_height=8, image_width=8, d_model=8, n_layer=2, d_state=4)


def test_row_and_patch_tokens_are_the_image_rearranged():
    img = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    rows = image_tokens(jnp.asarray(img), ClassifierConfig(**{**SMALL, "channels": 3}))
    assert rows.shape == (2, 8, 24)
    np.testing.assert_array_equal(rows[1, 5], img[1, 5].reshape(-1))
    patches = image_tokens(jnp.asarray(img), ClassifierConfig(**{**SMALL, "channels": 3, "patch_size": 4}))
    assert patches.shape == (2, 4, 48)
    # raster order of 4x4 patches: token 1 is rows 0..3, columns 4..7; token 2 is rows 4..7, columns 0..3
    np.testing.assert_array_equal(patches[0, 1], img[0, 0:4, 4:8].reshape(-1))
    np.testing.assert_array_equal(patches[1, 2], img[1, 4:8, 0:4].reshape(-1))


@pytest.mark.parametrize("patch_size,bidirectional", [(0, False), (2, True)])
def test_logits_shape_and_grey_images(patch_size, bidirectional):
    cfg = ClassifierConfig(**SMALL, patch_size=patch_size, bidirectional=bidirectional)
    model, params = init_classifier(cfg, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8))
    logits = jax.jit(model.apply)({"params": params}, x)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    # (b, H, W) and (b, H, W, 1) are the same input
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x[..., None]), logits, rtol=1e-6)
    # examples do not mix across the batch
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x[1:2]), logits[1:2], rtol=1e-5, atol=1e-6)


def test_bidirectional_adds_a_reverse_mixer_and_changes_the_output():
    uni = ClassifierConfig(**SMALL)
    bi = ClassifierConfig(**SMALL, bidirectional=True)
    m_uni, p_uni = init_classifier(uni, jax.random.PRNGKey(0))
    m_bi, p_bi = init_classifier(bi, jax.random.PRNGKey(0))
    assert "mixer_rev" in p_bi["layers_0"] and "mixer_rev" not in p_uni["layers_0"]
    mixer = count_params(p_uni["layers_0"]["mixer"])
    assert count_params(p_bi) == count_params(p_uni) + 2 * mixer
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8))
    # the same forward parameters, with and without the reverse scan: the outputs differ
    p_same = jax.tree_util.tree_map(lambda a: a, p_bi)
    for i in range(2):
        p_same["layers_" + str(i)]["mixer"] = p_uni["layers_" + str(i)]["mixer"]
        p_same["layers_" + str(i)]["norm"] = p_uni["layers_" + str(i)]["norm"]
    for k in ("embed", "pos_embed", "norm_f", "head"):
        p_same[k] = p_uni[k]
    y_uni = jax.jit(m_uni.apply)({"params": p_uni}, x)
    y_bi = jax.jit(m_bi.apply)({"params": p_same}, x)
    assert np.abs(np.asarray(y_bi - y_uni)).max() > 1e-4
    # with the reverse mixers' output projections zeroed, the bidirectional model is the unidirectional one
    for i in range(2):
        rev = p_same["layers_" + str(i)]["mixer_rev"]
        rev["out_proj"]["kernel"] = jnp.zeros_like(rev["out_proj"]["kernel"])
    np.testing.assert_allclose(jax.jit(m_bi.apply)({"params": p_same}, x), y_uni, rtol=1e-5, atol=1e-6)


def test_unidirectional_model_depends_on_the_row_order():
    cfg = ClassifierConfig(**SMALL)
    model, params = init_classifier(cfg, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8))
    y = jax.jit(model.apply)({"params": params}, x)
    assert np.abs(np.asarray(jax.jit(model.apply)({"params": params}, x[:, ::-1]) - y)).max() > 1e-4


@pytest.mark.parametrize("override,key", [
    (dict(d_model=0), "`d_model`"),
    (dict(n_layer=-1), "`n_layer`"),
    (dict(n_classes=1), "`n_classes`"),
    (dict(patch_size=3), "`patch_size`"),
    (dict(patch_size=-1), "`patch_size`"),
    (dict(scan_impl="fast"), "`scan_impl`"),
    (dict(bidirectional="yes"), "`bidirectional`"),
    (dict(dtype="int8"), "`dtype`"),
    (dict(image_height=2.5), "`image_height`"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        ClassifierConfig(**{**SMALL, **override})


def test_bad_images_are_rejected():
    cfg = ClassifierConfig(**SMALL)
    model, params = init_classifier(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="images"):
        jax.jit(model.apply)({"params": params}, jnp.zeros((2, 8, 7)))
    with pytest.raises(ValueError, match="images"):
        jax.jit(model.apply)({"params": params}, jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="floating"):
        jax.jit(model.apply)({"params": params}, jnp.zeros((2, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match="ClassifierConfig"):
        MambaClassifier(dict(SMALL))
