"""The SSD (Mamba-2) side of `mamba-jax bench kernels --op ssd`: inputs, the bytes that must move, the jitted
passes of an `ssd` impl, and the official mamba_ssm Triton kernel (`mamba_chunk_scan_combined`) timed
through torch in the same run when it is importable (it needs torch, triton and a CUDA GPU; its code is
pure Triton, so the `mamba_ssm` package's CUDA extensions are not needed for it).

Bytes that must move (element size s of x, z, B, C; dt, A, dt_bias are float32):
  forward   x, z (b·l·h·p each) + B, C (b·l·g·n each) in, dt (b·l·h) in, y (b·l·h·p) out, A, D, dt_bias (h)
  fwd+bwd   the forward's bytes, then the backward's: the forward's inputs again and dy in, dx, dz, dB, dC,
            ddt (same shapes) and dA, dD, d dt_bias out (the kernels recompute chunk states; y is not re-read)
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.ops import ssd

MAMBA_SSM = "mamba_ssm"  # the baseline name of the official kernel in --baselines


def shapes(batch: int, d: int, head_dim: int, groups: int, n: int):
    if d % head_dim:
        raise ValueError(f"bench kernels --op ssd: --d {d} must be a multiple of --head-dim {head_dim}")
    h = d // head_dim
    if h % groups:
        raise ValueError(f"bench kernels --op ssd: --groups {groups} must divide the {h} heads")
    return h, head_dim, groups, n


def min_bytes(b: int, l: int, h: int, p: int, g: int, n: int, itemsize: int) -> Dict[str, int]:
    """The bytes the forward and the forward+backward must move at the least (see the module docstring)."""
    big, small, dt, per_head = b * l * h * p * itemsize, b * l * g * n * itemsize, b * l * h * 4, h * 4
    inputs = 2 * big + 2 * small + dt + 3 * per_head
    fwd = inputs + big
    bwd = inputs + big + (2 * big + 2 * small + dt + 3 * per_head)
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}


def make_inputs(b: int, l: int, h: int, p: int, g: int, n: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    return dict(
        x=jax.random.normal(keys[0], (b, l, h, p), dtype),
        dt=jax.random.normal(keys[1], (b, l, h)) * 0.5 - 2.0,
        A=-jnp.exp(jax.random.normal(keys[2], (h,)) * 0.5),
        B=jax.random.normal(keys[3], (b, l, g, n), dtype),
        C=jax.random.normal(keys[4], (b, l, g, n), dtype),
        D=jax.random.normal(keys[5], (h,)),
        z=jax.random.normal(keys[6], (b, l, h, p), dtype),
        dt_bias=jnp.full((h,), 0.5, jnp.float32),
    )


def build(impl: str, chunk_size: int):
    fn = lambda a: ssd(**a, chunk_size=chunk_size, dt_softplus=True, impl=impl)  # noqa: E731
    fwd = jax.jit(fn)
    # the cotangent dy = y (grad of ½‖y‖²): one (b, l, h, p) read, as in a training step
    fwd_bwd = jax.jit(jax.grad(lambda a: 0.5 * jnp.sum(jnp.square(fn(a).astype(jnp.float32)))))
    return fwd, fwd_bwd


def mamba_ssm_available() -> Optional[str]:
    """None when the official kernel can run here, else why not."""
    try:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except ImportError as e:
        return f"mamba_ssm's Triton kernel is not importable ({e})"
    if not torch.cuda.is_available():
        return "mamba_ssm's Triton kernel needs a CUDA GPU"
    return None


def mamba_ssm_times(inputs, chunk_size: int, repeats: int, forward_only: bool) -> Dict[str, Optional[float]]:
    """Median seconds of the official `mamba_chunk_scan_combined` forward and forward+backward on the same
    values (copied to torch CUDA tensors; compilation and autotuning excluded by a warm-up call)."""
    import torch
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    dtypes = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float16): torch.float16,
              jnp.dtype(jnp.float32): torch.float32}
    t = {k: torch.tensor(np.asarray(v.astype(jnp.float32)), device="cuda").to(dtypes[jnp.dtype(v.dtype)])
         for k, v in inputs.items()}

    def run(grad: bool):
        leaves = {k: v.detach().requires_grad_(grad) for k, v in t.items()}
        y = mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size,
                                      D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True)
        if grad:
            y.backward(y.detach())  # the same cotangent as the JAX passes: dy = y
        return y

    def median_seconds(grad: bool) -> float:
        run(grad)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(grad)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"fwd_s": median_seconds(False), "fwd_bwd_s": None if forward_only else median_seconds(True)}
