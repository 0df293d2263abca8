"""Trace-time input validation shared by the ops.

Every check reads only static shapes and dtypes, so it runs once while tracing and costs nothing
inside `jax.jit`. Errors name the function, the argument, the shape it got and the shape expected.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def fmt_shape(dims: Sequence[object]) -> str:
    dims = tuple(dims)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def check_array(fn: str, name: str, x, expected: Sequence[object], *, kind: str = "float") -> None:
    """Raise ValueError unless `x` has the expected rank, sizes and dtype kind.

    `expected` mixes names (str, shown in the message) and ints (checked), e.g. ("b", 7, "n").
    `kind`: "float" (inexact dtype), "int" (integer dtype) or "any".
    """
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{fn}: `{name}` must be an array of shape {fmt_shape(expected)}; got {type(x).__name__}")
    sizes_ok = len(shape) == len(expected) and all(
        not isinstance(e, int) or e == s for e, s in zip(expected, shape)
    )
    if not sizes_ok:
        raise ValueError(f"{fn}: `{name}` must have shape {fmt_shape(expected)}; got {fmt_shape(shape)}")
    dtype = jnp.dtype(x.dtype)
    if kind == "float" and not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"{fn}: `{name}` must be a floating-point array; got dtype {dtype}")
    if kind == "int" and not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{fn}: `{name}` must be an integer array (e.g. int32); got dtype {dtype}")


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for float32/bf16/fp16 inputs, float64 when any input is float64."""
    dtypes = [jnp.dtype(a.dtype) for a in arrays if a is not None]
    return jnp.dtype(jnp.result_type(jnp.float32, *dtypes))
