"""Sharded == unsharded for every model family, on 8 fake CPU devices; run as a script (the device count
must be set before jax is imported): ``python tests/invariants/sharded_checks.py [FAMILY ...]`` (default: all).

For one family per layer kind (trained-scale parameters), one SGD train step — in training mode, so the
MoE capacity binds — on packed rows (seq_idx), under fsdp (data=2, fsdp=4) and tensor (data=2, tensor=4)
or, with MoE layers, tensor and expert parallelism (data=2, expert=4) plus the evaluation step (dropless:
all-gather + reduce-scatter); compared in loss, metrics, updated parameters and eval stats with the
1-device run; under tensor parallelism the compiled step may hold no collective-permute or all-to-all inside
the Mamba-1, Mamba-2 and attention layers (every collective kind counted per op name; the reductions that
row-parallel projections and shared B/C need are all-reduces, or an all-gather then a local sum). The companion plants a bug in the expert-parallel program (every device believes it
holds the first experts) and shows the same comparison catches it. Prints one line per check, "OK" last.
"""
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mamba_jax.sharding import MeshConfig, make_mesh_from_config  # noqa: E402
from mamba_jax.train import sharded_training  # noqa: E402
from mamba_jax.train import create_train_state, make_eval_step, make_train_step, path_names  # noqa: E402
from tests.invariants.families import FAMILIES, HALF, SHARDED_FAMILIES, VOCAB, model_and_params  # noqa: E402
from tests.sharding.collectives import collectives, inside_layers  # noqa: E402

NAMES = SHARDED_FAMILIES
# float32, different reduction orders across shards: ~1e-6 relative; 2e-4 as in tests/invariants/checks.py
TOL = 2e-4


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (8, 2 * HALF + 1)).astype(np.int32)
    seq_idx = np.zeros((8, 2 * HALF), np.int32)
    seq_idx[::2, HALF:] = 1                                     # half the rows hold two packed documents
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": rng.random((8, 2 * HALF)) < 0.8,
            "seq_idx": seq_idx}


def close(got, want, what):
    flat = lambda t: {"/".join(path_names(p)): np.asarray(x, np.float64)  # noqa: E731
                      for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want)))
    for k in want:
        scale = max(1.0, float(np.abs(want[k]).max()))
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL * scale, err_msg=f"{what}: {k}")


def meshes(name):
    """dp, fsdp and tensor for the plain families; dp, tensor and expert parallelism for those with MoE
    layers."""
    if FAMILIES[name].moe:
        return [("dp", MeshConfig(data=8)), ("tensor", MeshConfig(data=2, tensor=4)),
                ("fsdp", MeshConfig(data=2, expert=4))]
    return [("dp", MeshConfig(data=8)), ("fsdp", MeshConfig(data=2, fsdp=4)), ("tensor", MeshConfig(data=2, tensor=4))]


# The collective kinds a train step may run inside each kind of layer, per parallelism (anything else is data
# moved that the layout should not need): data parallelism only sums gradients; FSDP gathers weights and
# reduce-scatters (or all-reduces) their gradients; tensor parallelism sums the row-parallel projections'
# partial outputs (out_proj, the MLP's down projection, the experts' w_out) — and in Mamba-2 the gradients
# of B and C, which are shared by all heads of a group, are summed over the head shards (XLA may do it as an
# all-gather of the per-shard partials); expert parallelism sends tokens to their experts and back.
SUMS = {"all-reduce"}
ALLOWED = {
    "dp": {kind: SUMS for kind in ("M", "M2", "A", "E", "P")},
    "fsdp": {kind: {"all-gather", "reduce-scatter", "all-reduce"} for kind in ("M", "M2", "A", "E", "P")},
    "tensor": {"M": SUMS, "M2": SUMS | {"all-gather"}, "A": SUMS, "E": SUMS, "P": SUMS},
    "expert": {"M": SUMS, "M2": SUMS, "A": SUMS, "E": SUMS | {"all-to-all"}, "P": SUMS | {"all-to-all"}},
}
# ... and the ones the mechanism needs (so the count cannot pass by seeing nothing)
REQUIRED = {"fsdp": {"M": "all-gather", "M2": "all-gather", "A": "all-gather"},
            "tensor": {"M": "all-reduce", "M2": "all-reduce", "A": "all-reduce"},
            "expert": {"E": "all-to-all", "P": "all-to-all"}}


def parallelism(mesh_config) -> str:
    for axis in ("expert", "tensor", "fsdp"):
        if getattr(mesh_config, axis) > 1:
            return axis
    return "dp"


def check_collectives(counts, layer_kinds, mesh_config, what):
    """Every collective inside a layer is of a kind `ALLOWED` for its layer kind under this parallelism, and
    each layer has the `REQUIRED` one."""
    mode = parallelism(mesh_config)
    seen = {}
    for (kind, where), n in inside_layers(counts).items():
        layer = int(where.split("/")[0][len("layers_"):])
        seen.setdefault(layer, set()).add(kind)
    for layer, kinds in seen.items():
        extra = kinds - ALLOWED[mode][layer_kinds[layer]]
        assert not extra, (f"{what}: {sorted(extra)} inside layer {layer} ({layer_kinds[layer]}) under {mode}: "
                           f"{sorted(counts.items())}")
    for layer, kind in enumerate(layer_kinds):
        need = REQUIRED.get(mode, {}).get(kind)
        assert need is None or need in seen.get(layer, ()), f"{what}: no {need} in layer {layer} ({kind})"


def run(name, strategy, mesh_config, b, reference):
    model, params = model_and_params(name)
    tx = optax.sgd(0.1)
    tr = sharded_training(model, tx, make_mesh_from_config(mesh_config), strategy, donate=False)
    state = tr.shard_state(create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), tx))
    what = f"{name} {strategy} {mesh_config}"
    # e.g. tensor: whole heads and whole pieces per device, so nothing is re-laid-out inside a layer
    sharded_batch = tr.shard_batch(b)
    compiled = tr.train_step.jitted.lower(state, sharded_batch).compile()   # counted, then run (one compile)
    check_collectives(collectives(compiled.as_text()), model.config.layer_kinds, mesh_config, what)
    state, metrics = compiled(state, sharded_batch)
    ref_state, ref_metrics, ref_eval = reference
    close(metrics, ref_metrics, f"{what} train metrics")
    close(state.params, ref_state.params, f"{what} params after one step")
    if FAMILIES[name].moe:   # evaluation is a different program only with MoE layers (dropless routing)
        close(tr.eval_step(state.params, b), ref_eval, f"{what} eval")


def planted_fused_projection(model, b):
    """Planted: Mamba-1's [x | z] stored fused as one (d_model, 2·d_inner) kernel split over `tensor` (the
    previous layout): the same count sees the collective-permutes it costs inside the layer."""
    import mamba_jax.layers.mamba as mamba_layer
    real = mamba_layer.projection

    def fused(features, use_bias, axes, name, **kw):
        if not isinstance(features, tuple):
            return real(features, use_bias, axes, name, **kw)
        dense = real(features[0] * features[1], use_bias, (axes[0], axes[-1]), name, **kw)
        return lambda x: dense(x).reshape(*x.shape[:-1], *features)

    mamba_layer.projection = fused
    try:
        tr = sharded_training(type(model)(model.config), optax.sgd(0.1), make_mesh_from_config(
            MeshConfig(data=2, tensor=4)), "tensor", donate=False)
        state = tr.init_state(jax.random.PRNGKey(0))
        counts = collectives(tr.train_step.jitted.lower(state, tr.shard_batch(b)).compile().as_text())
        assert inside_layers(counts, ("collective-permute",)), sorted(counts.items())
    finally:
        mamba_layer.projection = real
        jax.clear_caches()


def main(names=NAMES):
    t0 = time.time()
    assert len(jax.devices()) == 8, jax.devices()
    unknown = sorted(set(names) - set(NAMES))
    assert not unknown, f"unknown families {unknown}; choose from {NAMES}"
    b = batch()
    for name in names:
        model, params = model_and_params(name)
        tx = optax.sgd(0.1)
        ref_state, ref_metrics = make_train_step(donate=False)(create_train_state(model.apply, params, tx), b)
        reference = (ref_state, ref_metrics, make_eval_step(model.apply)(ref_state.params, b))
        assert float(ref_metrics.get("moe_dropped_fraction", 1.0)) > 0, name     # MoE: the capacity binds
        for strategy, mesh_config in meshes(name):
            run(name, strategy, mesh_config, b, reference)
        print(f"{name} OK {time.time() - t0:.1f}s", flush=True)
        if name == "M[chunked]":
            planted_fused_projection(model, b)
            print(f"{name} planted fused [x | z] kernel caught OK", flush=True)
        if name == "M E[switch]":
            real = jax.lax.axis_index
            jax.lax.axis_index = lambda axis: 0 * real(axis)    # planted: every device holds "the first" experts
            try:
                run(name, "fsdp", MeshConfig(data=2, expert=4), b, reference)
                raise SystemExit("the planted expert-parallel bug was not caught")
            except AssertionError:
                print(f"{name} planted expert-offset bug caught OK", flush=True)
            finally:
                jax.lax.axis_index = real
                jax.clear_caches()
    print("OK", flush=True)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or NAMES)
