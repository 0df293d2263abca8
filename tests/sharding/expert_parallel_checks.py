"""Expert parallelism on 8 fake CPU devices against one device; run as a script (see
test_expert_parallel.py): prints one line per check and "OK" at the end."""
import os

# appended: keeps the caller's flags (tests/conftest.py); the last device count wins
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mamba_jax.layers.moe import MoE, MoEConfig  # noqa: E402
from mamba_jax.models import init_params  # noqa: E402
from mamba_jax.models.hybrid import HybridLM  # noqa: E402
from mamba_jax.models.moe_mamba import moe_mamba_config  # noqa: E402
from mamba_jax.sharding import MeshConfig, make_mesh_from_config  # noqa: E402
from mamba_jax.train import sharded_training  # noqa: E402
from mamba_jax.train import create_train_state, make_train_step  # noqa: E402

from collectives import collectives  # noqa: E402  (tests/sharding/collectives.py, beside this script)

TOL = 1e-5


def close(got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL,
                                   err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def layer_checks(mesh):
    n_ep, n_tp = mesh.shape["expert"], mesh.shape.get("tensor", 1)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 12, 16))
    for name, cf, router, dispatch in (("no drops", 16.0, "switch", "sorted"), ("drops", 0.5, "switch", "dense"),
                                       ("top-2 drops", 0.75, "topk", "sorted"), ("dropless top-2", None, "topk", "sorted")):
        layer = MoE(MoEConfig(n_experts=8, router=router, capacity_factor_eval=cf, dispatch=dispatch, d_expert=24))
        params = layer.init(jax.random.PRNGKey(1), x)["params"]
        params = jax.tree_util.tree_map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                                        is_leaf=lambda p: hasattr(p, "unbox"))

        def loss(p, x):
            y, m = layer.apply({"params": p}, x)
            return jnp.sum(jnp.sin(y)) + m["aux_loss"], (y, m)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (want_l, (want_y, want_m)), want_g = fn(params, x)
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(fn)(params, x))
            (got_l, (got_y, got_m)), got_g = fn(params, x)
        if cf is None:   # dropless: tokens gathered over the expert axis, shares reduce-scattered back
            assert "all_gather" in jaxpr and "reduce_scatter" in jaxpr, "dropless: no all-gather/reduce-scatter"
        else:
            assert "all_to_all" in jaxpr, "no all-to-all in the expert-parallel program"
        # each device holds E / n_ep experts and 24 / n_tp of their hidden units: the tensor devices split the
        # expert FLOPs instead of repeating them (and the partial outputs are summed over `tensor`)
        assert f"f32[{8 // n_ep},16,{24 // n_tp}]" in jaxpr, f"{name}: no per-device w_in slice in\n{jaxpr}"
        if n_tp > 1:
            assert "psum" in jaxpr and f"f32[{8 // n_ep},16,24]" not in jaxpr, name
        close(got_y, want_y, name)
        close(got_m, want_m, name)                 # same loads, same dropped fraction
        close(got_g, want_g, name)
        assert np.array_equal(np.all(np.asarray(got_y) == 0, -1), np.all(np.asarray(want_y) == 0, -1)), name
        if cf is not None and cf < 1:
            assert float(want_m["dropped_fraction"]) > 0, name
        print(f"MoE layer {name} OK", flush=True)
    # left padding (a different amount per sequence, so the shards hold different numbers of real tokens):
    # padding kept out of routing, metrics summed over the shards before dividing, equal to one device;
    # with a capacity and dropless
    mask = jnp.arange(12)[None, :] >= jnp.asarray([0, 11, 3, 5, 7, 2, 12, 9])[:, None]   # row 6: all padding
    for name, cf in (("padding", 0.75), ("dropless padding", None)):
        layer = MoE(MoEConfig(n_experts=8, router="topk", capacity_factor_eval=cf, dispatch="sorted", d_expert=24))
        params = layer.init(jax.random.PRNGKey(1), x)["params"]
        params = jax.tree_util.tree_map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                                        is_leaf=lambda p: hasattr(p, "unbox"))

        def masked_loss(p, x):
            y, m = layer.apply({"params": p}, x, token_mask=mask)
            return jnp.sum(jnp.sin(y)) + m["aux_loss"] + m["z_loss"], (y, m)

        fn = jax.jit(jax.value_and_grad(masked_loss, argnums=(0, 1), has_aux=True))
        (_, (want_y, want_m)), want_g = fn(params, x)
        with jax.set_mesh(mesh):
            (_, (got_y, got_m)), got_g = fn(params, x)
        close(got_y, want_y, name)
        close(got_m, want_m, name)
        close(got_g, want_g, name)
        assert np.all(np.asarray(want_y)[~np.asarray(mask)] == 0)
        assert (float(want_m["dropped_fraction"]) > 0) == (cf is not None), name
        print(f"MoE layer {name} OK", flush=True)
    refused(mesh, x, MoEConfig(n_experts=5), ("n_experts", "expert"), f"5 experts on an expert axis of {n_ep}")
    print("bad expert count OK", flush=True)
    if n_tp > 1:
        refused(mesh, x, MoEConfig(n_experts=8, d_expert=25), ("d_expert", "tensor"),
                f"d_expert 25 on a tensor axis of {n_tp}")
        print("bad expert width OK", flush=True)


def refused(mesh, x, config, words, what):
    """The MoE layer with `config` on `mesh` raises a ValueError naming each of `words`."""
    layer = MoE(config)
    variables = layer.init(jax.random.PRNGKey(1), x)
    try:
        with jax.set_mesh(mesh):
            layer.apply(variables, x)
    except ValueError as e:
        assert all(w in str(e) for w in words), e
        return
    raise AssertionError(f"{what} did not raise")


def model_check(mesh, strategy):
    config = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=2, n_experts=8, d_state=4, capacity_factor=1.0)
    model = HybridLM(config)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32, (8, 17)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 16), bool)}
    tx = optax.sgd(0.1)   # (Adam's first step, ~lr·sign(g), would amplify rounding of near-zero gradients)
    ref, ref_m = make_train_step(donate=False)(create_train_state(model.apply, params, tx), batch)
    tr = sharded_training(model, tx, mesh, strategy)
    w_in = tr.param_shardings["layers_1"]["mixer"]["moe"]["w_in"]
    assert w_in.spec[0] == "expert", w_in.spec
    if strategy == "tensor":   # hidden units over `tensor`, as the expert-parallel map takes them: no gather
        assert w_in.spec == P("expert", None, "tensor"), w_in.spec
        compiled = tr.train_step.jitted.lower(tr.abstract_state, tr.shard_batch(batch)).compile()
        moe_layers = {where: n for (kind, where), n in collectives(compiled.as_text()).items()
                      if where in ("layers_1/mixer", "layers_3/mixer") and kind in ("all-gather", "collective-permute")}
        assert not moe_layers, f"the MoE layers gather or permute under tensor parallelism: {moe_layers}"
        train_step = lambda s, b: compiled(s, tr.shard_batch(b))  # noqa: E731  (the program counted, run)
    else:
        train_step = tr.train_step
    state = tr.shard_state(create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), tx))
    state, m = train_step(state, batch)
    for key in ("loss", "router_loss", "moe_dropped_fraction"):
        assert abs(float(m[key]) - float(ref_m[key])) < TOL, (key, m[key], ref_m[key])
    close(state.params, ref.params, "MoE-Mamba train step")
    print(f"MoE-Mamba train step ({strategy}) OK", flush=True)


def tensor_bias_check(mesh):
    """Expert biases with the hidden units over `tensor` (no `expert` axis): b_in is split with w_in, b_out is
    added by one tensor device only — equal to one device with and without a capacity."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 12, 16))
    for name, cf in (("tensor biases drops", 0.75), ("tensor biases dropless", None)):
        layer = MoE(MoEConfig(n_experts=4, router="topk", capacity_factor_eval=cf, d_expert=24, expert_bias=True))
        params = layer.init(jax.random.PRNGKey(1), x)["params"]
        params = jax.tree_util.tree_map(lambda p: (p.unbox() if hasattr(p, "unbox") else p) + 0.1, params,
                                        is_leaf=lambda p: hasattr(p, "unbox"))   # nonzero biases
        fn = jax.jit(lambda p, x: layer.apply({"params": p}, x))
        want = fn(params, x)
        with jax.set_mesh(mesh):
            got = fn(params, x)
        close(got, want, name)
        print(f"MoE layer {name} OK", flush=True)


def main():
    assert len(jax.devices()) == 8
    mesh = make_mesh_from_config(MeshConfig(data=2, expert=4))
    layer_checks(mesh)
    model_check(mesh, "fsdp")
    # experts over `expert`, their hidden units over `tensor`
    mesh = make_mesh_from_config(MeshConfig(data=2, expert=2, tensor=2))
    layer_checks(mesh)
    model_check(mesh, "tensor")
    tensor_bias_check(make_mesh_from_config(MeshConfig(data=2, tensor=4)))
    print("OK", flush=True)


if __name__ == "__main__":
    main()
