"""Pallas kernels (GPU and TPU) for the selective scan and SSD — one folder per kernel.

Depends on jax only (never on `mamba_jax`); `mamba_jax.ops` dispatches here lazily with `impl="pallas"`,
and the tests compare against the `mamba_jax.ops` references.

- `selective_scan/`: Mamba-1 selective scan, forward and backward Pallas kernels with the TPU (Mosaic)
  layout (channels on lanes, sequence grid axis sequential, float32 state in VMEM scratch), tied by a
  `jax.custom_vjp`; `BlockSizes` picks the tiles. On CPU (and, until a Triton variant lands, on GPU) the
  kernels run in Pallas interpret mode.
- `ssd/`: Mamba-2 SSD chunked scan, forward and backward Pallas kernels (grid batch × heads × chunks, the
  chunk axis sequential, float32 (n, p) state in VMEM scratch; intra-chunk (C Bᵀ ∘ L) x matmuls plus the
  entering state's contribution), tied by a `jax.custom_vjp`; dt_bias/softplus, D and the z gate stay in
  plain JAX in `mamba_jax.ops.ssd(impl="pallas")`. Interpret mode on CPU and GPU.
- GPU (Triton) variants of both: still to come.
"""
