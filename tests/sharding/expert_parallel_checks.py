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

from mamba_jax.layers.moe import MoE, MoEConfig  # noqa: E402
from mamba_jax.models import init_params  # noqa: E402
from mamba_jax.models.hybrid import HybridLM  # noqa: E402
from mamba_jax.models.moe_mamba import moe_mamba_config  # noqa: E402
from mamba_jax.sharding import MeshConfig, make_mesh_from_config  # noqa: E402
from mamba_jax.train import sharded_training  # noqa: E402
from mamba_jax.train import create_train_state, make_train_step  # noqa: E402

TOL = 1e-5


def close(got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL,
                                   err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def layer_checks(mesh):
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
    try:
        bad = MoE(MoEConfig(n_experts=6))
        p = bad.init(jax.random.PRNGKey(1), x)
        with jax.set_mesh(mesh):
            bad.apply(p, x)
        raise AssertionError("6 experts on an expert axis of 4 did not raise")
    except ValueError as e:
        assert "n_experts" in str(e) and "expert" in str(e), e
    print("bad expert count OK", flush=True)


def model_check(mesh):
    config = moe_mamba_config(vocab_size=32, d_model=16, n_blocks=2, n_experts=8, d_state=4, capacity_factor=1.0)
    model = HybridLM(config)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32, (8, 17)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 16), bool)}
    tx = optax.sgd(0.1)   # (Adam's first step, ~lr·sign(g), would amplify rounding of near-zero gradients)
    ref, ref_m = make_train_step(donate=False)(create_train_state(model.apply, params, tx), batch)
    tr = sharded_training(model, tx, mesh, "fsdp")
    w_in = tr.param_shardings["layers_1"]["mixer"]["moe"]["w_in"]
    assert w_in.spec[0] == "expert", w_in.spec
    state = tr.shard_state(create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), tx))
    state, m = tr.train_step(state, batch)
    for key in ("loss", "router_loss", "moe_dropped_fraction"):
        assert abs(float(m[key]) - float(ref_m[key])) < TOL, (key, m[key], ref_m[key])
    close(state.params, ref.params, "MoE-Mamba train step")
    print("MoE-Mamba train step OK", flush=True)


def main():
    assert len(jax.devices()) == 8
    mesh = make_mesh_from_config(MeshConfig(data=2, expert=4))
    layer_checks(mesh)
    model_check(mesh)
    print("OK", flush=True)


if __name__ == "__main__":
    main()
