"""Depthwise causal 1-D convolution with a carried state (Mamba's short conv)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mamba_jax.ops._checks import check_array, compute_dtype

_ACTIVATIONS = {None: lambda x: x, "silu": jax.nn.silu}


def causal_conv1d(x, weight, bias=None, conv_state=None, seq_idx=None, activation: Optional[str] = None):
    """y_t = act(bias + Σ_j weight[j] · x_{t-k+1+j}) per channel, causal, with a carried state.

    Args:
      x: (b, l, d) input.
      weight: (k, d) depthwise kernel (torch's conv1d weight (d, 1, k), transposed).
      bias: optional (d,).
      conv_state: optional (b, k-1, d), the k-1 inputs before `x` (zeros when None).
      seq_idx: optional (b, l) integer ids of packed sequences: no tap crosses a change of id; the
        state counts as part of the first segment.
      activation: None or "silu".
    Returns:
      (y (b, l, d) in the dtype of `x`, new_conv_state (b, k-1, d)): the last k-1 inputs, with entries
      of earlier packed sequences zeroed so the state continues only the last sequence.
    """
    fn = "causal_conv1d"
    check_array(fn, "x", x, ("b", "l", "d"))
    b, l, d = x.shape
    check_array(fn, "weight", weight, ("k", d))
    k = weight.shape[0]
    if bias is not None:
        check_array(fn, "bias", bias, (d,))
    if conv_state is not None:
        check_array(fn, "conv_state", conv_state, (b, k - 1, d))
    if seq_idx is not None:
        check_array(fn, "seq_idx", seq_idx, (b, l), kind="int")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{fn}: `activation` must be one of {tuple(_ACTIVATIONS)}; got {activation!r}")

    cd = compute_dtype(x, weight, bias)
    if conv_state is None:
        conv_state = jnp.zeros((b, k - 1, d), x.dtype)
    xp = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1).astype(cd)  # (b, l+k-1, d)
    w = weight.astype(cd)
    if seq_idx is not None:
        sid = jnp.concatenate([jnp.repeat(seq_idx[:, :1], k - 1, axis=1), seq_idx], axis=1)
    y = jnp.zeros((b, l, d), cd) if bias is None else jnp.broadcast_to(bias.astype(cd), (b, l, d))
    for j in range(k):
        tap = xp[:, j:j + l]
        if seq_idx is not None:
            tap = jnp.where((sid[:, j:j + l] == seq_idx)[..., None], tap, 0)
        y = y + w[j] * tap
    new_state = xp[:, l:]
    if seq_idx is not None:
        new_state = jnp.where((sid[:, l:] == seq_idx[:, -1:])[..., None], new_state, 0)
    return _ACTIVATIONS[activation](y).astype(x.dtype), new_state.astype(x.dtype)


def conv_state_steps(conv_state, x):
    """The conv state after each position of a chunk: (b, k-1, d), (b, l, d) -> (b, l, k-1, d).

    Entry i holds the k-1 inputs up to and including position i (the state `causal_conv1d` returns after a
    chunk ending there; no packed sequences). Speculative decoding rolls a conv back to any of them."""
    fn = "conv_state_steps"
    check_array(fn, "x", x, ("b", "l", "d"))
    b, l, d = x.shape
    check_array(fn, "conv_state", conv_state, (b, "k-1", d))
    width = conv_state.shape[1]
    full = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)            # (b, k-1+l, d)
    window = jnp.arange(l)[:, None] + 1 + jnp.arange(width)[None, :]           # (l, k-1)
    return full[:, window]
