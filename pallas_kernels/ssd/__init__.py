"""Mamba-2 SSD chunked scan as Pallas kernels (TPU/Mosaic layout; interpret mode on CPU), fwd + bwd.

    from pallas_kernels.ssd import ssd_scan, BlockSizes
    y, final_states = ssd_scan(x, delta, A, B, C, initial_state=h0, seq_idx=seq_idx,
                               block_sizes=BlockSizes(chunk=256))

`delta` is the discretised Δ (dt_bias and softplus applied) and y is returned without the D skip and the
z gate: `mamba_jax.ops.ssd(..., impl="pallas")` adds those elementwise parts in plain JAX around this
kernel and is the full SSD contract. See `kernel.py` for the layout and `blocks.py` for the block sizes.
"""
from pallas_kernels.ssd.blocks import BlockSizes
from pallas_kernels.ssd.kernel import ssd_scan

__all__ = ["BlockSizes", "ssd_scan"]
