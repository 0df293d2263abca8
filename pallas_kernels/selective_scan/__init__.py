"""Mamba-1 selective scan as Pallas kernels (TPU/Mosaic layout; interpret mode on CPU), fwd + bwd.

    from pallas_kernels.selective_scan import selective_scan, BlockSizes
    y, last_state = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                   initial_state=h0, seq_idx=seq_idx, return_last_state=True)

The same contract as `mamba_jax.ops.selective_scan` (which dispatches here with `impl="pallas"`); see
`kernel.py` for the layout and `blocks.py` for the block sizes.
"""
from pallas_kernels.selective_scan.blocks import BlockSizes
from pallas_kernels.selective_scan.kernel import selective_scan

__all__ = ["BlockSizes", "selective_scan"]
