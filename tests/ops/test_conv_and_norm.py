"""causal_conv1d against numpy's convolution, state carrying, packed sequences; rms_norm vs numpy."""
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops import causal_conv1d, conv_state_steps, gated_rms_norm, rms_norm


def numpy_causal_conv(x, w, bias=None, history=None):
    """Per channel np.convolve over [history, x]; outputs aligned with x."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    b, l, d = x.shape
    k = w.shape[0]
    hist = np.zeros((b, k - 1, d)) if history is None else np.asarray(history, np.float64)
    full = np.concatenate([hist, x], axis=1)
    y = np.zeros((b, l, d))
    for i in range(b):
        for c in range(d):
            y[i, :, c] = np.convolve(full[i, :, c], w[::-1, c], mode="valid")
    return y if bias is None else y + np.asarray(bias, np.float64)


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_numpy_convolution(k):
    x, w, bias, state = rand(0, 2, 9, 5), rand(1, k, 5), rand(2, 5), rand(3, 2, k - 1, 5)
    y, new_state = causal_conv1d(x, w, bias, conv_state=state)
    np.testing.assert_allclose(y, numpy_causal_conv(x, w, bias, state), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new_state, jnp.concatenate([state, x], 1)[:, 9:])
    y0, _ = causal_conv1d(x, w)
    np.testing.assert_allclose(y0, numpy_causal_conv(x, w), rtol=1e-5, atol=1e-5)


def test_silu_activation_and_dtype():
    x, w = rand(4, 1, 6, 3).astype(jnp.bfloat16), rand(5, 4, 3).astype(jnp.bfloat16)
    y, state = causal_conv1d(x, w, activation="silu")
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.bfloat16
    ref = numpy_causal_conv(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(y.astype(jnp.float32), ref / (1 + np.exp(-ref)), rtol=1e-2, atol=1e-2)


def test_state_carries_across_chunks():
    x, w, bias = rand(6, 2, 11, 4), rand(7, 4, 4), rand(8, 4)
    y_all, s_all = causal_conv1d(x, w, bias)
    y1, s1 = causal_conv1d(x[:, :2], w, bias)  # shorter than the kernel
    y2, s2 = causal_conv1d(x[:, 2:], w, bias, conv_state=s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_all, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(s2, s_all)


def test_packed_sequences_do_not_leak():
    lengths = [3, 1, 6]
    x, w, bias = rand(9, 1, 10, 3), rand(10, 4, 3), rand(11, 3)
    seq_idx = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
    y, state = causal_conv1d(x, w, bias, seq_idx=seq_idx)
    start = 0
    for length in lengths:
        alone, alone_state = causal_conv1d(x[:, start:start + length], w, bias)
        np.testing.assert_allclose(y[:, start:start + length], alone, rtol=1e-6, atol=1e-6)
        start += length
    np.testing.assert_array_equal(state, alone_state)


def test_new_state_keeps_only_the_last_packed_sequence():
    x, w = rand(12, 1, 5, 2), rand(13, 4, 2)
    seq_idx = jnp.asarray([[0, 0, 0, 1, 1]], jnp.int32)
    _, state = causal_conv1d(x, w, seq_idx=seq_idx)
    np.testing.assert_array_equal(state[:, 0], 0.0)  # position 2 belongs to sequence 0
    np.testing.assert_array_equal(state[:, 1:], x[:, 3:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.zeros((2, 5))), r"`x` must have shape \(b, l, d\); got \(2, 5\)"),
    (dict(weight=jnp.zeros((4, 2))), r"`weight` must have shape \(k, 3\); got \(4, 2\)"),
    (dict(bias=jnp.zeros((4,))), r"`bias` must have shape \(3,\)"),
    (dict(conv_state=jnp.zeros((2, 4, 3))), r"`conv_state` must have shape \(2, 3, 3\)"),
    (dict(seq_idx=jnp.zeros((2, 5), jnp.float32)), r"`seq_idx` must be an integer array"),
    (dict(activation="relu"), r"`activation` must be one of"),
])
def test_bad_inputs(kwargs, match):
    args = dict(x=jnp.zeros((2, 5, 3)), weight=jnp.zeros((4, 3)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**args)


def test_rms_norm_matches_numpy():
    x, w = rand(14, 3, 7), rand(15, 7)
    xn = np.asarray(x, np.float64)
    ref = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5) * np.asarray(w)
    np.testing.assert_allclose(rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)
    assert rms_norm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [12, 4, 3])
def test_gated_rms_norm_matches_numpy(norm_before_gate, group_size):
    x, z, w = rand(16, 2, 5, 12), rand(17, 2, 5, 12), rand(18, 12)
    xn, zn = np.asarray(x, np.float64), np.asarray(z, np.float64)
    gate = zn / (1 + np.exp(-zn))
    v = xn if norm_before_gate else xn * gate
    groups = v.reshape(2, 5, 12 // group_size, group_size)
    normed = (groups / np.sqrt((groups ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(2, 5, 12) * np.asarray(w)
    expected = normed * gate if norm_before_gate else normed
    out = gated_rms_norm(x, z, w, group_size, 1e-5, norm_before_gate)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_gated_rms_norm_bad_inputs():
    x = jnp.zeros((2, 12))
    with pytest.raises(ValueError, match="`group_size` must be a positive int dividing d=12"):
        gated_rms_norm(x, x, jnp.ones(12), 5)
    with pytest.raises(ValueError, match=r"`weight` must have shape \(12,\)"):
        gated_rms_norm(x, x, jnp.ones(11), 4)
    with pytest.raises(ValueError, match="`z` must have the shape of `x`"):
        gated_rms_norm(x, jnp.zeros((2, 11)), jnp.ones(12), 4)


def test_conv_state_steps_is_the_state_after_each_prefix():
    rng = np.random.default_rng(5)
    x, state, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 3), (2, 3, 3), (4, 3)))
    steps = conv_state_steps(state, x)
    assert steps.shape == (2, 5, 3, 3)
    for i in range(5):
        np.testing.assert_array_equal(steps[:, i], causal_conv1d(x[:, :i + 1], w, conv_state=state)[1])
    # the window is the last k-1 inputs: position 0 keeps two of the old state's rows, then x[:, 0]
    np.testing.assert_array_equal(steps[:, 0], np.concatenate([state[:, 1:], x[:, :1]], 1))
