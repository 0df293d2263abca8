"""Mamba-1 selective scan as Pallas kernels, fwd + bwd: a TPU (Mosaic) variant (interpret mode on CPU)
and a GPU (Triton) variant.

    from pallas_kernels.selective_scan import selective_scan, BlockSizes
    y, last_state = selective_scan(u, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                   initial_state=h0, seq_idx=seq_idx, return_final_state=True)

The same contract as `mamba_jax.ops.selective_scan` (which dispatches here with `impl="pallas"`); see
`kernel.py` for the TPU layout, `triton_kernel.py` for the GPU one and `blocks.py` for the block sizes.
`variant=None` picks per platform when lowering (Mosaic on TPU, Triton on CUDA GPUs, the TPU variant
interpreted elsewhere); `variant="triton", interpret=True` runs the GPU kernels interpreted on any host.
"""
from pallas_kernels.selective_scan.blocks import BlockSizes
from pallas_kernels.selective_scan.kernel import VARIANTS, selective_scan

__all__ = ["BlockSizes", "VARIANTS", "selective_scan"]
