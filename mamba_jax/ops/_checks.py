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


# --- value checks: only where the array is concrete (eager calls, wrappers outside `jit`) -----------------

def concrete_value(x):
    """`x` as a numpy array when its value is known (not a tracer inside `jit`/`grad`), else None.

    Value checks run on concrete arrays only: under `jit` the caller's graph guards itself (ids are clipped,
    masks select), and the wrappers users call from Python (`prefill`, `generate`, evaluation, data
    pipelines) see concrete arrays and raise there."""
    import jax
    import numpy as np

    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _first_index(bad) -> tuple:
    import numpy as np
    return tuple(int(i) for i in np.argwhere(bad)[0])


def check_mask_values(fn: str, name: str, mask) -> None:
    """Raise ValueError unless a concrete `mask` holds only 0/1 (False/True), naming the first other value
    and its position. A mask selects (`jnp.where`); a value such as 0.5 has no meaning there."""
    import numpy as np

    m = concrete_value(mask)
    if m is None or m.dtype == np.bool_:
        return
    bad = (m != 0) & (m != 1)
    if bad.any():
        pos = _first_index(bad)
        raise ValueError(f"{fn}: `{name}` must hold only 0 and 1 (1 = real token, 0 = padding); got {m[pos].item()!r} "
                         f"at position {pos}")


def check_token_ids(fn: str, name: str, ids, vocab_size: int, mask=None) -> None:
    """Raise ValueError when a concrete `ids` array has a real token (`mask` != 0, or every token when `mask`
    is None) outside [0, vocab_size), naming the id, its position and vocab_size. Padding (mask 0) may hold
    any id: it is never read."""

    v = concrete_value(ids)
    if v is None:
        return
    bad = (v < 0) | (v >= vocab_size)
    m = concrete_value(mask)
    if m is not None and m.shape == v.shape:
        bad &= m != 0
    if bad.any():
        pos = _first_index(bad)
        raise ValueError(f"{fn}: `{name}` holds the id {int(v[pos])} at position {pos}, outside the vocabulary "
                         f"[0, vocab_size={vocab_size})" + ("" if mask is None else " at a real (mask 1) position"))


def check_left_padded(fn: str, name: str, mask) -> None:
    """Raise ValueError unless a concrete (b, l) `mask` is left-padded: each row 0…0 1…1 with a real last
    token (decoding continues from the last column). Names the first bad row."""
    import numpy as np

    m = concrete_value(mask)
    if m is None or m.ndim != 2:
        return
    real = m != 0
    bad_rows = np.nonzero(~real[:, -1] | np.any(real[:, :-1] & ~real[:, 1:], axis=1))[0]
    if bad_rows.size:
        row = int(bad_rows[0])
        raise ValueError(f"{fn}: `{name}` must be left-padded — each row zeros then ones, ending with a real "
                         f"token — but row {row} is {m[row].astype(int).tolist()} (right or inner padding: put the "
                         "padding on the left)")
