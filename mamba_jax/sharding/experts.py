"""Expert parallelism: MoE experts spread over the mesh's `expert` axis, tokens exchanged with all-to-all.

Inside `jax.shard_map` every device holds g/N of the routing groups (sequences; the batch is split over
the data-parallel axes *and* `expert`) and E/n_ep of the experts. It routes and packs its own tokens into
the (g_local, E, C, d) expert buffer exactly as on one device (`mamba_jax.ops.mixture_of_experts`: routing,
capacity and drops are per group, so they do not depend on the sharding), then

    all_to_all over `expert` (split the E axis, gather the groups)  -> (g_local · n_ep, E / n_ep, C, d)
    its own experts' FFNs                                            -> (g_local · n_ep, E / n_ep, C, d)
    all_to_all back                                                  -> (g_local, E, C, d)

and combines. On a mesh with a `tensor` axis too, each expert's FFN is split along its hidden dimension
(w_in columns, w_out rows over `tensor`): every tensor device computes its slice of the hidden units for the
same tokens and a psum over `tensor` after the output projection completes the outputs (b_out is added by
one tensor device only), so the tensor devices share the expert FLOPs instead of repeating them.
The metrics are added up as (numerator, denominator) sums over the devices holding different
groups before dividing, so they equal the one-device metrics (also with a `token_mask` of padding).
On a mesh without an `expert` axis the same map runs with the experts whole on every device (routing per
shard of sequences, hidden units over `tensor`): the partitioner alone would gather the router logits for
`top_k` on every device. With no mesh in context (or a batch that does not split over the data axes, e.g.
one sequence decoding) this is `mixture_of_experts` itself.

Dropless (``capacity_factor=None``, `mixture_of_experts_dropless`) has no fixed-size buffer to exchange, so
tokens move the other way: each device all-gathers the tokens of its `expert`-axis peers, runs its own
experts' share of every assignment (a grouped matmul; the other experts' rows give zero), and a
reduce-scatter (`psum_scatter`) sums the shares and returns every device its own tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mamba_jax.axes import BATCH_MESH_AXES
from mamba_jax.ops.moe import expert_ffn, finish_routing_metrics, mixture_of_experts, mixture_of_experts_dropless
from mamba_jax.sharding.kernels import context_mesh

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _tensor_partial_bias(b_out, tensor_axis: Optional[str]):
    """b_out on the first device of `tensor_axis`, zeros on the others: the psum of the partial outputs adds
    it once."""
    if b_out is None or tensor_axis is None:
        return b_out
    return jnp.where(jax.lax.axis_index(tensor_axis) == 0, b_out, jnp.zeros_like(b_out))


def _local_moe(x, logits, w_in, w_out, b_in, b_out, *, activation, router, k, capacity_factor, dispatch,
               compute_dtype, expert_axis: Optional[str], tensor_axis: Optional[str] = None, token_mask=None,
               seq_idx=None, metric_sums: bool = False):
    """tensor_axis: the mesh axis splitting the experts' hidden dimension (w_in, b_in and w_out hold this
    device's slice of it): outputs are summed over it after the output projection."""
    cast = lambda a: None if a is None else a.astype(compute_dtype)  # noqa: E731
    b_out = _tensor_partial_bias(b_out, tensor_axis)
    if capacity_factor is None:
        if expert_axis is None:
            y, sums = mixture_of_experts_dropless(x, logits, w_in, w_out, b_in, b_out, router=router, k=k,
                                                  activation=activation, expert_dtype=compute_dtype,
                                                  token_mask=token_mask, metric_sums=metric_sums)
        else:
            y, sums = _dropless_expert_parallel(x, logits, w_in, w_out, b_in, b_out, router=router, k=k,
                                                activation=activation, compute_dtype=compute_dtype,
                                                expert_axis=expert_axis, token_mask=token_mask)
        return (y if tensor_axis is None else jax.lax.psum(y, tensor_axis)), sums

    def experts(xe):
        if expert_axis is not None:   # tokens to the devices holding their experts
            xe = jax.lax.all_to_all(xe, expert_axis, split_axis=1, concat_axis=0, tiled=True)
        ye = expert_ffn(xe.astype(compute_dtype), cast(w_in), cast(w_out), cast(b_in), cast(b_out), activation)
        if tensor_axis is not None:   # the hidden slices' partial outputs summed
            ye = jax.lax.psum(ye, tensor_axis)
        if expert_axis is not None:   # and back
            ye = jax.lax.all_to_all(ye, expert_axis, split_axis=0, concat_axis=1, tiled=True)
        return ye

    return mixture_of_experts(x, logits, experts, router=router, k=k, capacity_factor=capacity_factor,
                              dispatch=dispatch, token_mask=token_mask, seq_idx=seq_idx, metric_sums=metric_sums)


def _dropless_expert_parallel(x, logits, w_in, w_out, b_in, b_out, *, router, k, activation, compute_dtype,
                              expert_axis: str, token_mask=None):
    """Inside shard_map: this device's experts' share of the dropless MoE of its `expert`-axis peers' tokens,
    summed over the axis and scattered back. Returns (y (g_local, t, d_out), metric sums).

    The metric sums cover the gathered tokens, so every device of the `expert` axis holds the same sums and
    the caller's psum over the group axes counts them n_ep times — numerators and denominators alike, so
    the finished ratios are exact."""
    gather = lambda a: None if a is None else jax.lax.all_gather(a, expert_axis, axis=0, tiled=True)  # noqa: E731
    first = jax.lax.axis_index(expert_axis) * w_in.shape[0]
    share, sums = mixture_of_experts_dropless(gather(x), gather(logits), w_in, w_out, b_in, b_out, router=router,
                                              k=k, activation=activation, expert_dtype=compute_dtype,
                                              token_mask=gather(token_mask), metric_sums=True, first_expert=first)
    return jax.lax.psum_scatter(share, expert_axis, scatter_dimension=0, tiled=True), sums


def expert_parallel_moe(x, logits, w_in, w_out, b_in=None, b_out=None, *, activation: str = "relu",
                        router: str = "switch", k: Optional[int] = None, capacity_factor: Optional[float] = 1.0,
                        dispatch: str = "sorted", compute_dtype="float32", token_mask=None, seq_idx=None):
    """An MoE layer's expert computation, expert-parallel on the context mesh.

    x: (g, t, d) routing groups; logits: (g, t, E); w_in (E, d, f), w_out (E, f, d_out), b_in (E, f),
    b_out (E, d_out); token_mask: optional (g, t), 1 = real token, 0 = padding (kept out of routing, see
    `mixture_of_experts`); seq_idx: optional (g, t) int, packed documents (the causal capacity restarts at
    each); capacity_factor None: dropless (`mixture_of_experts_dropless`).
    Returns (y (g, t, d_out), metrics) as `mixture_of_experts`.
    On a mesh with `tensor` > 1 the experts' hidden width f is split over `tensor` (see the module docstring).
    Raises ValueError when E is not divisible by the `expert` axis, f by the `tensor` axis or g by the
    group-sharding axes.
    """
    opts = dict(activation=activation, router=router, k=k, capacity_factor=capacity_factor, dispatch=dispatch,
                compute_dtype=compute_dtype)
    mesh = context_mesh()
    local = lambda: _local_moe(x, logits, w_in, w_out, b_in, b_out, expert_axis=None,  # noqa: E731
                               token_mask=token_mask, seq_idx=seq_idx, **opts)
    if mesh is None:
        return local()
    n_ep = mesh.shape.get(EXPERT_AXIS, 1)
    n_experts, groups = logits.shape[-1], x.shape[0]
    if n_experts % n_ep:
        raise ValueError(f"MoE: `n_experts`={n_experts} must be divisible by the mesh's `expert` axis "
                         f"({n_ep} devices; MeshConfig.expert)")
    n_tp = mesh.shape.get(TENSOR_AXIS, 1)
    tensor_axis = TENSOR_AXIS if n_tp > 1 else None
    group_axes = tuple(a for a in BATCH_MESH_AXES if mesh.shape.get(a, 1) > 1)
    shards = math.prod(mesh.shape[a] for a in group_axes)
    if n_ep == 1 and (groups % shards or not (group_axes or tensor_axis)):
        # no expert axis and a batch that does not split (e.g. one sequence decoding), or nothing to split:
        # the partitioner places it
        return local()
    if w_in.shape[-1] % n_tp:
        raise ValueError(f"MoE: the expert width (`d_expert`={w_in.shape[-1]}) must be divisible by the mesh's "
                         f"`tensor` axis ({n_tp} devices; MeshConfig.tensor): each expert's hidden units are "
                         f"split over it")
    expert_axis = EXPERT_AXIS if n_ep > 1 else None
    if groups % shards:
        raise ValueError(f"MoE: the batch ({groups} sequences) must be divisible by the {shards} devices of the "
                         f"mesh axes {group_axes} (MeshConfig data/fsdp/expert): each device routes whole "
                         f"sequences")
    tokens = P(group_axes, None, None)
    per_expert = [w_in, w_out] + [b for b in (b_in, b_out) if b is not None]
    has_bias = b_in is not None, b_out is not None

    for name, arr in (("token_mask", token_mask), ("seq_idx", seq_idx)):
        if arr is not None and getattr(arr, "shape", None) != x.shape[:2]:
            raise ValueError(f"MoE: `{name}` must have shape (g, t) = {tuple(x.shape[:2])}; "
                             f"got {getattr(arr, 'shape', type(arr).__name__)}")
    has_mask, has_seq = token_mask is not None, seq_idx is not None and capacity_factor is not None

    def per_shard(x, logits, *rest):
        rest = list(rest)
        mask = rest.pop(0) if has_mask else None
        seq = rest.pop(0) if has_seq else None
        w_in, w_out = rest.pop(0), rest.pop(0)
        b_in = rest.pop(0) if has_bias[0] else None
        b_out = rest.pop(0) if has_bias[1] else None
        y, sums = _local_moe(x, logits, w_in, w_out, b_in, b_out, expert_axis=expert_axis,
                             tensor_axis=tensor_axis, token_mask=mask, seq_idx=seq, metric_sums=True, **opts)
        # numerators and denominators summed over the shards of groups, then divided
        return y, finish_routing_metrics(jax.lax.psum(sums, group_axes))

    # the hidden dimension (w_in's and b_in's last, w_out's middle) over `tensor`
    hidden = {"w_in": P(expert_axis, None, tensor_axis), "w_out": P(expert_axis, tensor_axis, None),
              "b_in": P(expert_axis, tensor_axis), "b_out": P(expert_axis, None)}
    names = ["w_in", "w_out"] + [n for n, b in (("b_in", b_in), ("b_out", b_out)) if b is not None]
    expert_specs = [hidden[n] for n in names]
    masks = [token_mask] * has_mask + [seq_idx] * has_seq
    mask_specs = [P(group_axes, None)] * (has_mask + has_seq)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(tokens, tokens, *mask_specs, *expert_specs),
                         out_specs=(tokens, P()))(x, logits, *masks, *per_expert)
