"""Decoding with MoE experts kept in host memory (JAX memory kinds).

`offload_experts(params)` places every MoE expert weight (`w_in`, `w_out`, and their biases) in host memory
(`jax.memory.Space.Host`: pinned host memory where the backend has it); the rest stays on the device.
`offloaded_step(model, params, token_ids, cache)` is `step` for such params: inside the one compiled
program each layer's experts are moved to device memory (`jax.device_put(w, jax.memory.Space.Device)`),
which XLA lowers to asynchronous copies (`copy-start` / `copy-done`) that its scheduler starts ahead of the
layer that reads them — loading a layer's experts while earlier layers compute. On a CPU, host and device
memory are the same RAM and the program is the same computation; on a GPU or TPU the copies cross the
host link (see `mamba_jax.models.m2r2.offload_decode_latency` for what that costs, and
`expert_prediction_hit_rates` for predicting which experts a later layer will need).
"""
from __future__ import annotations

import functools

import jax

from mamba_jax.inference import _step
from mamba_jax.models.lm import DecoderLM, ModelCache

__all__ = ["expert_bytes", "is_expert_weight", "offload_experts", "offloaded_step"]

EXPERT_WEIGHTS = ("w_in", "w_out", "b_in", "b_out")


def is_expert_weight(path) -> bool:
    """Whether a params-tree path (a `jax.tree_util` key path) is an MoE expert weight."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "moe" in names and names[-1] in EXPERT_WEIGHTS


def _map_experts(fn, params):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(x) if is_expert_weight(p) else x, params)


def expert_bytes(params) -> int:
    """Bytes of the MoE expert weights in `params`."""
    total = [0]
    _map_experts(lambda x: total.__setitem__(0, total[0] + x.size * x.dtype.itemsize), params)
    return total[0]


def offload_experts(params):
    """`params` with every MoE expert weight in host memory; raises ValueError when there is none."""
    if not expert_bytes(params):
        raise ValueError("offload_experts: `params` has no MoE expert weights (`moe/w_in`, `moe/w_out`): "
                         "only models with 'E' or 'P' layers have experts to offload")
    return _map_experts(lambda x: jax.device_put(x, jax.memory.Space.Host), params)


def offloaded_step(model: DecoderLM, params, token_ids, cache: ModelCache):
    """`inference.step` for params from `offload_experts`: (logits (b, vocab), new cache); the experts move to
    device memory inside the compiled step (asynchronous copies XLA schedules ahead of their layers)."""
    return _offloaded_step(model, params, token_ids, cache)


@functools.partial(jax.jit, static_argnums=0)
def _offloaded_step(model: DecoderLM, params, token_ids, cache: ModelCache):
    on_device = _map_experts(lambda x: jax.device_put(x, jax.memory.Space.Device), params)
    return _step(model, on_device, token_ids, cache)
