"""MoE experts in host memory: `offload_experts` places exactly the expert weights there, `offloaded_step`
(experts moved to device memory inside the compiled step) equals `step`, and the same step compiles for a
TPU topology with the experts as host-memory arguments moved by asynchronous copies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference import prefill, step
from mamba_jax.inference.offload import expert_bytes, is_expert_weight, offload_experts, offloaded_step
from tests.invariants.families import model_and_params, tokens


def test_offloaded_step_equals_step_and_only_experts_live_in_host_memory():
    model, params = model_and_params("M E[switch]")
    _, cache = prefill(model, params, tokens(3, 2, 6))
    host = offload_experts(params)
    kinds = jax.tree_util.tree_map_with_path(lambda p, x: (is_expert_weight(p), x.sharding.memory_kind), host)
    flat = jax.tree_util.tree_leaves(kinds, is_leaf=lambda x: isinstance(x, tuple))
    assert sum(e for e, _ in flat) == 2 * sum(k == "E" for k in model.config.layer_kinds)   # w_in, w_out
    assert all(kind == ("pinned_host" if e else "device") for e, kind in flat), flat
    ids = jnp.array([3, 5], jnp.int32)
    want_logits, want_cache = step(model, params, ids, cache)
    got_logits, got_cache = offloaded_step(model, host, ids, cache)
    np.testing.assert_array_equal(got_logits, want_logits)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_cache, want_cache)
    with pytest.raises(ValueError, match="no MoE expert weights"):
        offload_experts(model_and_params("M[reference]")[1])


def test_offloaded_step_compiles_for_a_tpu_topology_with_host_experts():
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mamba_jax import aot
    from mamba_jax.inference.offload import _offloaded_step
    from mamba_jax.models import init_cache

    model, params = model_and_params("M E[switch]")
    devices = aot.topology_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("data",))
    on = lambda kind: NamedSharding(mesh, P(), memory_kind=kind)           # noqa: E731
    spec = lambda x, kind="device": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on(kind))  # noqa: E731
    abstract = jax.tree_util.tree_map_with_path(
        lambda p, x: spec(x, "pinned_host" if is_expert_weight(p) else "device"), params)
    cache = jax.tree_util.tree_map(spec, jax.eval_shape(lambda: init_cache(model.config, 2, 16)))
    ids = spec(jnp.zeros((2,), jnp.int32))
    compiled = _offloaded_step.lower(model, abstract, ids, cache).compile()
    resident = _offloaded_step.lower(model, jax.tree_util.tree_map(spec, params), ids, cache).compile()
    # the experts' bytes (TPU-tiled: padded above their raw size) left the device arguments for the host's
    memory, all_device = compiled.memory_analysis(), resident.memory_analysis()
    assert memory.host_argument_size_in_bytes >= expert_bytes(params) > 0
    assert all_device.host_argument_size_in_bytes == 0
    assert (all_device.argument_size_in_bytes - memory.argument_size_in_bytes
            == memory.host_argument_size_in_bytes)
    text = compiled.as_text()
    host_params = [line for line in text.splitlines() if " parameter(" in line and "S(5)" in line]
    assert len(host_params) == 2 * sum(k == "E" for k in model.config.layer_kinds), host_params
    assert text.count("copy-start(") >= len(host_params)      # moved asynchronously, not read in place
