"""Pallas kernels (GPU and TPU) for the selective scan and SSD — one folder per kernel.

Depends on jax only (never on `mamba_jax`); `mamba_jax.ops` dispatches here lazily with `impl="pallas"`,
and the tests compare against the `mamba_jax.ops` references.

- `selective_scan/`: Mamba-1 selective scan, forward and backward Pallas kernels with the TPU (Mosaic)
  layout (channels on lanes, sequence grid axis sequential, float32 state in VMEM scratch), tied by a
  `jax.custom_vjp`; `BlockSizes` picks the tiles. On CPU (and, until a Triton variant lands, on GPU) the
  kernels run in Pallas interpret mode.
- SSD (Mamba-2) kernels and the GPU (Triton) selective-scan variant: still to come; `ssd(impl="pallas")`
  is not available yet.
"""
