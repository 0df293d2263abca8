"""Every sharding strategy on 8 fake CPU devices against the unsharded run; run as a script.

    python tests/sharding/multi_device_checks.py OUT_DIR

(`test_strategies.py` runs it in a subprocess: the device count must be set before jax is imported.)
Prints one line per check and "OK" at the end; writes OUT_DIR/ckpt (the fsdp state after 2 steps,
saved from 8 devices) and OUT_DIR/expected.npz (its values) for the in-process 1-device restore test.
"""
import os
import sys
import time

# appended: keeps the caller's flags (tests/conftest.py); the last device count wins
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from collectives import collectives, inside_layers  # noqa: E402  (tests/sharding/collectives.py)
from mamba_jax.models import MambaConfig, MambaLM, init_params  # noqa: E402
from mamba_jax.sharding import MeshConfig, make_mesh_from_config  # noqa: E402
from mamba_jax.train import sharded_training  # noqa: E402
from mamba_jax.train import (  # noqa: E402
    Checkpointer,
    OptimizerConfig,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    path_names,
)

TOL = 1e-5
CONFIG = MambaConfig(vocab_size=64, d_model=32, n_layer=2, d_state=4)   # d_inner 64: divisible by 4 and 8


def make_batches(n, batch=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(inputs=rng.integers(0, 64, (batch, length)).astype(np.int32),
                 targets=rng.integers(0, 64, (batch, length)).astype(np.int32),
                 loss_mask=rng.random((batch, length)) < 0.6) for _ in range(n)]


def flat(tree):
    return {"/".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_close(got, want, what):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want)))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=f"{what}: {k}")


def assert_equal(got, want, what):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), what
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


def distinct_shards(x):
    return len({tuple((s.start, s.stop) for s in shard.index) for shard in x.addressable_shards})


def mixer(params, i=0):
    return params[f"layers_{i}"]["mixer"]


def pallas_checks(model, tx, batches, ref_metrics):
    """impl="pallas" on a mesh runs the kernel per shard (`selective_scan_on_mesh`, what the layers call:
    shard_map, batch over data, channels over tensor) and equals the 1-device `reference` scan, alone
    (values and gradients) and in a train step."""
    from mamba_jax.sharding.kernels import selective_scan_on_mesh as selective_scan

    keys = jax.random.split(jax.random.PRNGKey(5), 9)
    b, l, d, g, n = 4, 12, 16, 4, 4
    args = dict(u=jax.random.normal(keys[0], (b, l, d)), dt=jax.random.normal(keys[1], (b, l, d)),
                A=-jnp.exp(jax.random.normal(keys[2], (d, n))), B=jax.random.normal(keys[3], (b, l, g, n)),
                C=jax.random.normal(keys[4], (b, l, g, n)), D=jax.random.normal(keys[5], (d,)),
                z=jax.random.normal(keys[6], (b, l, d)), dt_bias=jax.random.normal(keys[7], (d,)) * 0.1,
                initial_state=jax.random.normal(keys[8], (b, d, n)))
    seq_idx = jnp.asarray(np.repeat([[0] * 5 + [1] * 7], b, axis=0), jnp.int32)

    def loss(impl):
        def f(a):
            y, h = selective_scan(**a, seq_idx=seq_idx, dt_softplus=True, return_final_state=True, impl=impl,
                                  chunk_size=8)
            return jnp.sum(y * jnp.cos(y)) + jnp.sum(h ** 2)
        return jax.jit(jax.value_and_grad(f))

    want = loss("reference")(args)
    mesh = make_mesh_from_config(MeshConfig(data=2, tensor=4))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(loss("pallas"))(args))
        got = loss("pallas")(args)
    assert "shard_map" in jaxpr, "the kernel did not run per shard"
    # dA, dD, d(dt_bias) are float32 sums over b·l = 48 terms, reduced per shard then across shards:
    # a different summation order than the 1-device scan, ~m·eps·Σ|terms| ≈ 1e-5 relative here
    got, want = flat(got), flat(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=f"pallas per shard: {k}")

    pallas_model = MambaLM(CONFIG.replace(scan_impl="pallas"))
    tr = sharded_training(pallas_model, tx, mesh, "tensor")
    state = tr.init_state(jax.random.PRNGKey(0))
    state, metrics = tr.train_step(state, batches[0])
    assert abs(float(metrics["loss"]) - float(ref_metrics[0]["loss"])) < TOL, (metrics["loss"], ref_metrics[0])


def ssd_pallas_checks():
    """ssd(impl="pallas") on a mesh runs the kernel per shard (`ssd_on_mesh`: rows over data, heads over
    tensor; B/C replicated for one group, split with the heads for 4) and equals the 1-device `reference`
    SSD in values and gradients."""
    from mamba_jax.sharding.kernels import ssd_on_mesh as ssd

    mesh = make_mesh_from_config(MeshConfig(data=2, tensor=4))
    b, l, h, p, n = 4, 12, 8, 4, 4
    for g in (1, 4):
        keys = jax.random.split(jax.random.PRNGKey(6 + g), 9)
        args = dict(x=jax.random.normal(keys[0], (b, l, h, p)), dt=jax.random.normal(keys[1], (b, l, h)),
                    A=-jnp.exp(jax.random.normal(keys[2], (h,))), B=jax.random.normal(keys[3], (b, l, g, n)),
                    C=jax.random.normal(keys[4], (b, l, g, n)), D=jax.random.normal(keys[5], (h,)),
                    z=jax.random.normal(keys[6], (b, l, h, p)), dt_bias=jax.random.normal(keys[7], (h,)) * 0.1,
                    initial_state=jax.random.normal(keys[8], (b, h, p, n)))
        seq_idx = jnp.asarray(np.repeat([[0] * 5 + [1] * 7], b, axis=0), jnp.int32)

        def loss(impl):
            def f(a):
                y, s = ssd(**a, chunk_size=8, dt_softplus=True, seq_idx=seq_idx, return_final_state=True, impl=impl)
                return jnp.sum(y * jnp.cos(y)) + jnp.sum(s ** 2)
            return jax.jit(jax.value_and_grad(f))

        want = loss("reference")(args)
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(loss("pallas"))(args))
            got = loss("pallas")(args)
        assert "shard_map" in jaxpr, "the SSD kernel did not run per shard"
        got, want = flat(got), flat(want)
        # float32 sums over b·l·p terms (dA, dD, d dt_bias) reduced per shard, then across shards: as above
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=f"ssd pallas, g={g}: {k}")


def mamba1_input_form_checks(tx, batches):
    """MambaInLlama's Mamba-1 form (B/C/x from the layer input, in groups; the attention-initialised
    student's mixer) trained with d_inner over `tensor`: 2 steps equal the unsharded ones."""
    cfg = MambaConfig(vocab_size=64, d_model=32, n_layer=1, d_state=8, dt_rank=4, bc_source="input", d_xb=32)
    model = MambaLM(cfg)       # [z, C] (2, 32, 64), [x, B] (2, 32, 32): 64 / 4 shards = 2 groups of 8
    ref = create_train_state(model.apply, init_params(model, jax.random.PRNGKey(3)), tx)
    step, ref_metrics = make_train_step(donate=False), []
    state0 = jax.tree_util.tree_map(jnp.copy, ref)
    for b in batches[:2]:
        ref, m = step(ref, b)
        ref_metrics.append(m)
    tr = sharded_training(model, tx, make_mesh_from_config(MeshConfig(data=2, tensor=4)), "tensor")
    state = tr.shard_state(state0)
    for name in ("in_proj_zc", "in_proj_xb"):
        k = mixer(state.params)[name]["kernel"]
        assert k.sharding.spec == P(None, None, "tensor") and distinct_shards(k) == 4, (name, k.sharding.spec)
    compiled = tr.train_step.jitted.lower(state, tr.shard_batch(batches[0])).compile()
    counts = collectives(compiled.as_text())
    assert not inside_layers(counts, ("collective-permute", "all-to-all", "reduce-scatter")), sorted(counts.items())
    for b, want in zip(batches[:2], ref_metrics):
        state, got = compiled(state, tr.shard_batch(b))
        assert_close(got, want, "mamba1 input form metrics")
    assert_close(state.params, ref.params, "mamba1 input form params")


def main(out_dir):
    t0 = time.time()
    assert len(jax.devices()) == 8, jax.devices()
    model = MambaLM(CONFIG)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    batches = make_batches(3)

    # the unsharded reference: 2 steps, then eval
    ref0 = create_train_state(model.apply, init_params(model, jax.random.PRNGKey(0)), tx)
    step = make_train_step(donate=False)
    ref, ref_metrics = ref0, []
    for b in batches[:2]:
        ref, m = step(ref, b)
        ref_metrics.append(m)
    ref_eval = make_eval_step(model.apply)(ref.params, batches[2])
    print(f"reference {time.time() - t0:.1f}s (cpu {time.process_time():.1f}s)", flush=True)

    cases = [("dp", MeshConfig(data=8)), ("fsdp", MeshConfig(data=2, fsdp=4)),
             ("tensor", MeshConfig(data=2, tensor=4))]
    fsdp_state = None
    for strategy, mesh_config in cases:
        mesh = make_mesh_from_config(mesh_config)
        tr = sharded_training(model, tx, mesh, strategy)
        if strategy == "fsdp":   # created directly sharded: must equal init_params
            state = tr.init_state(jax.random.PRNGKey(0))
            assert_equal(state.params, ref0.params, "fsdp init_state")
        else:
            state = tr.shard_state(jax.tree_util.tree_map(jnp.copy, ref0))

        # the parameters (and Adam moments) are sharded as intended
        k, mu = mixer(state.params)["in_proj"]["kernel"], mixer(state.opt_state[1][0].mu)["in_proj"]["kernel"]
        # in_proj: (2, d_model, d_inner), [x | z] pieces; fsdp splits d_model, tensor splits d_inner
        spec, shards = {"dp": (P(), 1), "fsdp": (P(None, "fsdp"), 4), "tensor": (P(None, None, "tensor"), 4)}[strategy]
        assert k.sharding.spec == spec and distinct_shards(k) == shards, (strategy, k.sharding.spec)
        assert mu.sharding.spec == spec and distinct_shards(mu) == shards, (strategy, mu.sharding.spec)
        assert state.step.sharding.spec == P() and state.opt_state[1][0].count.sharding.spec == P()
        m0 = mixer(state.params)
        if strategy == "fsdp":   # no embed axis: the fallback shards the largest divisible dimension
            assert m0["A_log"].sharding.spec == P("fsdp") and m0["conv1d_kernel"].sharding.spec == P(None, "fsdp")
            assert state.params["embeddings"]["embedding"].sharding.spec == P(None, "fsdp")
        if strategy == "tensor":  # every d_inner dimension over `tensor`: the scan runs on local channels
            for name, want in [("out_proj", P("tensor")), ("x_proj", P("tensor"))]:
                assert m0[name]["kernel"].sharding.spec == want, (name, m0[name]["kernel"].sharding.spec)
            for name, want in [("A_log", P("tensor")), ("D", P("tensor")), ("conv1d_kernel", P(None, "tensor")),
                               ("dt_proj_kernel", P(None, "tensor")), ("dt_proj_bias", P("tensor"))]:
                assert m0[name].sharding.spec == want, (name, m0[name].sharding.spec)
            assert state.params["embeddings"]["embedding"].sharding.spec == P("tensor")
            # inside the layers only all-reduces (Megatron: after the row-parallel out_proj and x_proj, and
            # the input-gradient reductions of the backward) — no all-gather, no collective-permute (the
            # split of a fused [x | z] kernel sharded over `tensor` used to cost 4 per layer), no all-to-all or
            # reduce-scatter; counted over every collective kind. The compiled step is the one run below.
            compiled = tr.train_step.jitted.lower(state, tr.shard_batch(batches[0])).compile()
            counts = collectives(compiled.as_text())
            moving = inside_layers(counts, ("all-gather", "collective-permute", "all-to-all", "reduce-scatter"))
            assert not moving and inside_layers(counts), sorted(counts.items())
            print(f"tensor collectives: {sorted(counts.items())}", flush=True)
            train_step = lambda s, b: compiled(s, tr.shard_batch(b))  # noqa: E731
        else:
            train_step = tr.train_step

        metrics = []
        for b in batches[:2]:
            state, m = train_step(state, b)
            metrics.append(m)
        assert state.params["norm_f"]["weight"].sharding == tr.param_shardings["norm_f"]["weight"]
        for got, want in zip(metrics, ref_metrics):
            assert got["loss"].sharding.is_fully_replicated
            assert_close(got, want, f"{strategy} metrics")
        assert_close(state.params, ref.params, f"{strategy} params")
        assert_close(state.opt_state, ref.opt_state, f"{strategy} opt_state")
        assert_close(tr.eval_step(state.params, batches[2]), ref_eval, f"{strategy} eval")

        if strategy == "dp":      # a batch the data axes do not divide is a clear error (before donation)
            try:
                tr.train_step(state, make_batches(1, batch=4)[0])
                raise AssertionError("batch 4 on data=8 did not raise")
            except ValueError as e:
                assert "not divisible" in str(e) and "'data'" in str(e), e
            assert not state.params["norm_f"]["weight"].is_deleted()
        if strategy == "fsdp":
            fsdp_state = state
        print(f"{strategy} OK {time.time() - t0:.1f}s (cpu {time.process_time():.1f}s)", flush=True)

    # a mesh that does not use every device
    try:
        make_mesh_from_config(MeshConfig(data=3))
        raise AssertionError("data=3 on 8 devices did not raise")
    except ValueError as e:
        assert "`data`" in str(e) and "8 devices" in str(e), e

    pallas_checks(model, tx, batches, ref_metrics)
    print(f"pallas per shard OK {time.time() - t0:.1f}s (cpu {time.process_time():.1f}s)", flush=True)
    ssd_pallas_checks()
    print(f"ssd pallas per shard OK {time.time() - t0:.1f}s (cpu {time.process_time():.1f}s)", flush=True)
    mamba1_input_form_checks(tx, batches)
    print(f"mamba1 input form tensor OK {time.time() - t0:.1f}s (cpu {time.process_time():.1f}s)", flush=True)

    # the fsdp state saved from 8 devices restores onto 1 and 4 devices with identical values
    saved = jax.device_get(fsdp_state)
    with Checkpointer(os.path.join(out_dir, "ckpt"), async_save=False) as ckpt:
        ckpt.save(2, fsdp_state, {"step": 2})
    np.savez(os.path.join(out_dir, "expected.npz"), **flat({"params": saved.params, "opt_state": saved.opt_state}))
    for devices, mesh_config, shards in [(jax.devices()[:1], MeshConfig(), 1),
                                         (jax.devices()[:4], MeshConfig(fsdp=-1), 4)]:
        tr = sharded_training(model, tx, make_mesh_from_config(mesh_config, devices=devices), "fsdp")
        with Checkpointer(os.path.join(out_dir, "ckpt")) as ckpt:
            restored, meta = ckpt.restore(tr.abstract_state)
        assert meta == {"step": 2} and int(restored.step) == 2
        k = mixer(restored.params)["in_proj"]["kernel"]
        assert k.sharding == mixer(tr.param_shardings)["in_proj"]["kernel"] and distinct_shards(k) == shards
        assert len(k.sharding.device_set) == len(devices)
        assert_equal(restored.params, saved.params, f"restore on {len(devices)}")
        assert_equal(restored.opt_state, saved.opt_state, f"restore on {len(devices)}")
        # exactly the shardings the mesh's jitted train step expects (else jit raises on a mismatch)
        for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(tr.state_shardings)):
            assert got.sharding == want, (got.sharding, want)
        print(f"restore onto {len(devices)} device(s) OK {time.time() - t0:.1f}s "
              f"(cpu {time.process_time():.1f}s)", flush=True)
    print("OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
