"""Running the scans on a sharded program: `jax.shard_map` over the mesh in context.

GSPMD cannot partition a Mosaic (TPU Pallas) custom call ("Mosaic kernels cannot be automatically
partitioned"), so a kernel inside a sharded `jax.jit` must run per shard. The selective scan is
independent per sequence and per channel, so each device scans its own rows (batch over the
data-parallel axes) and its own channels (d_inner over `tensor`) with no communication at all.

`selective_scan_on_mesh` and `ssd_on_mesh` have the contracts of `mamba_jax.ops.selective_scan` and
`mamba_jax.ops.ssd` (which know nothing of meshes); the layers call them. When the op resolves to the Pallas
kernels and a mesh is in context (`with jax.set_mesh(mesh):` — sharded training and `mamba-jax aot` trace
under it) the op runs per shard; otherwise it is the op itself.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from mamba_jax.axes import BATCH_MESH_AXES
from mamba_jax.ops.selective_scan import resolve_impl, selective_scan
from mamba_jax.ops.ssd import resolve_ssd_impl, ssd

CHANNEL_MESH_AXIS = "tensor"


def context_mesh():
    """The (abstract) mesh set with `jax.set_mesh`, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def batch_split_axes(mesh, batch: int):
    """The data-parallel mesh axes (`BATCH_MESH_AXES`, in order) a batch of `batch` rows is split over: each
    axis joins while the product of the sizes still divides `batch` (a micro-batch too small for every
    axis is split over the ones it fills, not replicated)."""
    axes, size = [], 1
    for a in BATCH_MESH_AXES:
        n = mesh.shape.get(a, 1)
        if n > 1 and batch % (size * n) == 0:
            axes.append(a)
            size *= n
    return tuple(axes)


def constrain_batch(x):
    """`x` (b, ...) constrained to be split over the data-parallel axes of the context mesh that b fills
    (`batch_split_axes`; identity without a mesh). Keeps GSPMD from propagating a parameter's FSDP sharding
    (embed over `fsdp`) into the activations, which would replicate the batch."""
    mesh = context_mesh()
    if mesh is None:
        return x
    axes = batch_split_axes(mesh, x.shape[0])
    return jax.lax.with_sharding_constraint(x, P(axes)) if axes else x


def scan_partition(mesh, batch: int, channels: int, groups: int):
    """(batch axes or None, channel axis or None) to split a (b, l, d) scan over on `mesh`: batch over
    the data-parallel axes it fills (`batch_split_axes`), d over `tensor` when it and the B/C groups allow
    (g == 1, or g a multiple of the tensor size so every device's channels read their own groups)."""
    batch_axes = batch_split_axes(mesh, batch) or None
    t = mesh.shape.get(CHANNEL_MESH_AXIS, 1)
    channel_axis = CHANNEL_MESH_AXIS if t > 1 and channels % t == 0 and (groups == 1 or groups % t == 0) else None
    return batch_axes, channel_axis


def _run_per_shard(kernel: Callable, args, specs, out_specs, mesh):
    """``kernel(*args)`` in `jax.shard_map` over `mesh`: args[i] split by specs[i] (None args are passed
    through as None, not as shard_map operands), outputs assembled by `out_specs`."""
    present = [i for i, a in enumerate(args) if a is not None]

    def per_shard(*given):
        full: list = [None] * len(args)
        for i, a in zip(present, given):
            full[i] = a
        return kernel(*full)

    # check_vma=False: pallas_call outputs carry no varying-manual-axes annotation
    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs[i] for i in present), out_specs=out_specs,
                         check_vma=False)(*(args[i] for i in present))


def selective_scan_on_mesh(u, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
                           initial_state=None, seq_idx=None, return_final_state: bool = False, impl: str = "auto",
                           chunk_size=None):
    """`mamba_jax.ops.selective_scan` (same arguments and results), run per shard when it resolves to the
    Pallas kernels on a sharded program: rows over the data-parallel axes, channels over `tensor` (when the
    B/C groups allow), no communication. Shapes: u, dt, z (b, l, d); A (d, n); B, C (b, l, n) or
    (b, l, g, n); D, dt_bias (d,); initial_state (b, d, n); seq_idx (b, l)."""
    opts = dict(dt_softplus=dt_softplus, return_final_state=return_final_state, chunk_size=chunk_size)
    args = (u, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    mesh = context_mesh()
    if mesh is None or resolve_impl(impl, u.shape[1]) != "pallas":
        return selective_scan(*args[:5], D=D, z=z, dt_bias=dt_bias, initial_state=initial_state,
                              seq_idx=seq_idx, impl=impl, **opts)
    b, _, d = u.shape
    groups = 1 if B.ndim == 3 else B.shape[2]
    bs, ch = scan_partition(mesh, b, d, groups)

    def kernel(u, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx):
        return selective_scan(u, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state,
                              seq_idx=seq_idx, impl="pallas", **opts)

    if bs is None and ch is None:
        return kernel(*args)
    bc = P(bs, None, None) if B.ndim == 3 else P(bs, None, ch, None)
    specs = (P(bs, None, ch), P(bs, None, ch), P(ch, None), bc, bc, P(ch), P(bs, None, ch), P(ch),
             P(bs, ch, None), P(bs, None))
    y_spec = P(bs, None, ch)
    out_specs = (y_spec, P(bs, ch, None)) if return_final_state else y_spec
    return _run_per_shard(kernel, args, specs, out_specs, mesh)


def ssd_on_mesh(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
                initial_state=None, seq_idx=None, return_final_state: bool = False, impl: str = "auto"):
    """`mamba_jax.ops.ssd` (same arguments and results), run per shard when it resolves to the Pallas
    kernels on a sharded program: rows over the data-parallel axes, heads over `tensor` (when the B/C groups
    allow, as in `scan_partition`), no communication. Shapes: x, z (b, l, h, p); dt (b, l, h); A, dt_bias
    (h,); D (h,) or (h, p); B, C (b, l, g, n); initial_state (b, h, p, n); seq_idx (b, l)."""
    opts = dict(chunk_size=chunk_size, dt_softplus=dt_softplus)
    args = (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    mesh = context_mesh()
    if mesh is None or resolve_ssd_impl(impl) != "pallas":
        return ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state, seq_idx=seq_idx,
                   return_final_state=return_final_state, impl=impl, **opts)
    b, _, h, _ = x.shape
    bs, hd = scan_partition(mesh, b, h, B.shape[2])

    def kernel(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx):
        return ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state, seq_idx=seq_idx,
                   return_final_state=True, impl="pallas", **opts)

    if bs is None and hd is None:
        out = kernel(*args)
    else:
        bc = P(bs, None, hd if B.shape[2] > 1 else None, None)
        d_spec = None if D is None else (P(hd) if D.ndim == 1 else P(hd, None))
        specs = (P(bs, None, hd, None), P(bs, None, hd), P(hd), bc, bc, d_spec, P(bs, None, hd, None), P(hd),
                 P(bs, hd, None, None), P(bs, None))
        out = _run_per_shard(kernel, args, specs, (P(bs, None, hd, None), P(bs, hd, None, None)), mesh)
    return out if return_final_state else out[0]


def trace_under_mesh(fn: Callable, mesh) -> Callable:
    """`fn` (a jitted function) called — and so traced — with `mesh` in context, so that kernels inside
    it run per shard (`selective_scan_on_mesh`, `ssd_on_mesh`). Keeps `.lower` working the same way."""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn.lower(*args, **kwargs)

    call.lower = lower
    return call

