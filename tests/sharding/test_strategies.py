"""Sharding strategies (dp, fsdp, tensor) against the unsharded run, errors that name the config keys,
restoring an 8-device checkpoint on 1 device, and best-by-metric checkpoint retention."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from mamba_jax.models import MambaConfig, MambaLM, param_axes
from mamba_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    STRATEGIES,
    batch_sharding,
    check_batch,
    logical_to_shardings,
    logical_to_spec,
    make_mesh_from_config,
    strategy_rules,
)
from mamba_jax.train import Checkpointer, OptimizerConfig, make_optimizer, path_names, sharded_training

CHECKS = os.path.join(os.path.dirname(__file__), "multi_device_checks.py")
SMALL = MambaConfig(vocab_size=64, d_model=32, n_layer=2, d_state=4)


def _param_shapes(model):
    from mamba_jax.models import init_params
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Runs every multi-device check in one subprocess with 8 fake CPU devices (see multi_device_checks.py)."""
    out_dir = tmp_path_factory.mktemp("eight_devices")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, CHECKS, str(out_dir)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(CHECKS))))
    return out, out_dir


def test_every_strategy_on_eight_devices_equals_one_device(eight_devices):
    out, _ = eight_devices
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr[-5000:]
    for line in ("dp OK", "fsdp OK", "tensor OK", "pallas per shard OK", "mamba1 input form tensor OK",
                 "restore onto 1 device(s) OK",
                 "restore onto 4 device(s) OK"):
        assert line in out.stdout, out.stdout


def test_checkpoint_from_eight_devices_restores_in_a_one_device_process(eight_devices):
    out, out_dir = eight_devices
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(jax.devices()) == 1
    model = MambaLM(SMALL)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    tr = sharded_training(model, tx, make_mesh_from_config(MeshConfig()), "fsdp")
    with Checkpointer(str(out_dir / "ckpt")) as ckpt:
        restored, meta = ckpt.restore(tr.abstract_state)
    assert meta == {"step": 2} and int(restored.step) == 2
    expected = np.load(out_dir / "expected.npz")
    got = {"/".join(path_names(p)): np.asarray(x) for p, x in
           jax.tree_util.tree_flatten_with_path({"params": restored.params, "opt_state": restored.opt_state})[0]}
    assert set(got) == set(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_mesh_config_sizes_and_errors():
    assert MeshConfig(data=-1, tensor=4).resolve(8) == (2, 1, 4, 1)
    assert MeshConfig(data=2, fsdp=4).resolve(8) == (2, 4, 1, 1)
    assert MeshConfig().resolve(1) == (1, 1, 1, 1)
    mesh = make_mesh_from_config(MeshConfig(fsdp=-1))
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert") and mesh.devices.size == 1
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
    with pytest.raises(ValueError, match=r"`data`, `tensor`.*8 devices|= 6 but there are 8 devices"):
        MeshConfig(data=3, tensor=2).resolve(8)
    with pytest.raises(ValueError, match=r"MeshConfig\(data=2.*= 2 but there are 1 devices.*`data`"):
        make_mesh_from_config(MeshConfig(data=2))
    with pytest.raises(ValueError, match=r"does not divide the 8 devices, so `data=-1` has no size; change `tensor`"):
        MeshConfig(data=-1, tensor=3).resolve(8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="`tensor` must be a positive int"):
        MeshConfig(tensor=0)


def test_rules_map_logical_axes_and_replicate_what_is_not_sharded():
    mesh = AbstractMesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"))
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh, strategy_rules("dp")) == P()
    assert logical_to_spec(("mlp", "state"), (64, 4), mesh, strategy_rules("fsdp")) == P()
    assert logical_to_spec(("mlp", "state"), (64, 4), mesh, strategy_rules("fsdp"), fsdp_fallback=True) == P("fsdp")
    # odd sizes: the fallback leaves a parameter with no divisible dimension replicated
    assert logical_to_spec(("mlp",), (7,), mesh, strategy_rules("fsdp"), fsdp_fallback=True) == P()
    # a mesh axis is used once per array; axes the mesh lacks count as size 1
    assert logical_to_spec(("embed", "embed"), (4, 4), mesh, DEFAULT_RULES) == P("fsdp")
    assert logical_to_spec(("expert", "embed"), (4, 4), AbstractMesh((2,), ("fsdp",)), DEFAULT_RULES) == P(None, "fsdp")
    assert batch_sharding(make_mesh_from_config(MeshConfig()), "fsdp").spec == P(("data", "fsdp", "expert"))
    assert set(STRATEGIES) == {"dp", "fsdp", "tensor", "fsdp_tensor"}
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero'"):
        strategy_rules("zero")


@pytest.mark.parametrize("heads, kv_heads, match", [
    (6, 6, r"_proj/kernel: dimension 1 \(logical axis '(kv_)?heads', size 6, set by the model config's n_(kv_)?heads"),
    (8, 2, r"k_proj/kernel: dimension 1 \(logical axis 'kv_heads', size 2, set by the model config's n_kv_heads"),
])
def test_tensor_parallelism_never_splits_a_head(heads, kv_heads, match):
    """Attention kernels are (d_model, heads, head_dim): `tensor` = 4 must divide the number of heads (and of
    kv heads) — 6 heads, or 2 kv heads, are refused instead of being split mid-head (with 48 = 6 · 8 columns
    of a flattened kernel they used to pass the divisibility check)."""
    from mamba_jax.models import TransformerConfig, TransformerLM
    mesh = AbstractMesh((2, 4), ("data", "tensor"))
    model = TransformerLM(TransformerConfig(vocab_size=64, d_model=48, n_layer=1, n_heads=heads, n_kv_heads=kv_heads,
                                            head_dim=8, d_intermediate=64))
    axes, shapes = param_axes(model), _param_shapes(model)
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, P))
    with pytest.raises(ValueError, match=match):
        for (path, shape), spec in zip(leaves, specs):
            logical_to_spec(tuple(spec), shape.shape, mesh, strategy_rules("tensor"),
                            name="/".join(path_names(path)))
    ok = TransformerLM(TransformerConfig(vocab_size=64, d_model=48, n_layer=1, n_heads=8, n_kv_heads=4, head_dim=8,
                                         d_intermediate=64))
    q = param_axes(ok)["layers_0"]["mixer"]["q_proj"]["kernel"]
    assert logical_to_spec(tuple(q), (48, 8, 8), mesh, strategy_rules("tensor")) == P(None, "tensor")


def test_whole_model_tensor_and_fsdp_specs():
    model = MambaLM(SMALL)
    axes, shapes = param_axes(model), _param_shapes(model)
    mesh = AbstractMesh((2, 1, 4, 1), ("data", "fsdp", "tensor", "expert"))
    sh = logical_to_shardings(axes, shapes, mesh, "tensor")
    mixer = sh["layers_1"]["mixer"]
    assert mixer["in_proj"]["kernel"].spec == P(None, None, "tensor") and mixer["out_proj"]["kernel"].spec == P("tensor")
    assert sh["norm_f"]["weight"].spec == P() and sh["embeddings"]["embedding"].spec == P("tensor")
    sh = logical_to_shardings(axes, shapes, AbstractMesh((1, 8, 1, 1), ("data", "fsdp", "tensor", "expert")), "fsdp")
    leaves = jax.tree_util.tree_leaves(sh)
    assert all("fsdp" in s.spec for s in leaves), [s.spec for s in leaves]   # every parameter sharded


def test_dimension_not_divisible_by_its_mesh_axis_names_the_keys():
    model = MambaLM(MambaConfig(vocab_size=64, d_model=33, n_layer=1, d_state=4))   # d_inner 66
    axes, shapes = param_axes(model), _param_shapes(model)
    mesh = AbstractMesh((1, 1, 8, 1), ("data", "fsdp", "tensor", "expert"))
    with pytest.raises(ValueError, match=r"parameter 'layers_0/mixer/A_log': dimension 0 \(logical "
                                         r"axis 'mlp', size 66.*d_inner.*`tensor`=8 \(MeshConfig keys 'tensor'\)"):
        logical_to_shardings(axes, shapes, mesh, "tensor")
    model = MambaLM(MambaConfig(vocab_size=64, d_model=36, n_layer=1, d_state=4))
    axes, shapes = param_axes(model), _param_shapes(model)
    with pytest.raises(ValueError, match=r"logical axis 'embed', size 36, set by the model config's d_model\) is "
                                         r"not divisible by mesh axes `fsdp`=8"):
        logical_to_shardings(axes, shapes, AbstractMesh((1, 8, 1, 1), ("data", "fsdp", "tensor", "expert")), "fsdp")


def test_batch_not_divisible_by_the_data_axes_names_the_keys():
    mesh = AbstractMesh((2, 4, 1, 1), ("data", "fsdp", "tensor", "expert"))
    check_batch({"inputs": np.zeros((16, 4))}, mesh, "fsdp")
    with pytest.raises(ValueError, match=r"batch 'inputs': the batch size 12 is not divisible by the data-parallel "
                                         r"mesh axes `data`=2·`fsdp`=4 \(MeshConfig keys 'data', 'fsdp'"):
        check_batch({"inputs": np.zeros((12, 4))}, mesh, "fsdp")
    check_batch({"inputs": np.zeros((12, 4))}, mesh, "dp")   # dp splits the batch over `data` only


def _tiny_state(value):
    return {"w": np.full((4,), value, np.float32)}


def test_checkpointer_keeps_the_best_by_metric_and_the_latest(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 3.0, 6: 0.5, 7: 9.0}
    with Checkpointer(str(tmp_path / "best"), max_to_keep=2, best_metric="eval_loss", best_mode="min",
                      async_save=False) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, _tiny_state(step), {"step": step, "eval_loss": loss})
        assert ckpt.all_steps() == (2, 6, 7)        # best two by eval_loss + the newest
        assert ckpt.best_step() == 6
        state, meta = ckpt.restore(_tiny_state(0), step=ckpt.best_step())
    np.testing.assert_array_equal(state["w"], np.full((4,), 6, np.float32))
    assert meta["eval_loss"] == 0.5
    with Checkpointer(str(tmp_path / "max"), max_to_keep=1, best_metric="accuracy", best_mode="max",
                      keep_latest=0, async_save=False) as ckpt:
        for step, acc in [(1, 0.2), (2, 0.9), (3, 0.5)]:
            ckpt.save(step, _tiny_state(step), {"step": step}, metrics={"accuracy": acc})
        assert ckpt.all_steps() == (2,) and ckpt.best_step() == 2
    with Checkpointer(str(tmp_path / "latest"), max_to_keep=2, async_save=False) as ckpt:   # unchanged default
        for step in (1, 2, 3):
            ckpt.save(step, _tiny_state(step), {"step": step})
        assert ckpt.all_steps() == (2, 3)
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(str(tmp_path / "bad"), best_metric="eval_loss", best_mode="lowest")


def test_restore_onto_explicit_shardings(tmp_path):
    mesh = make_mesh_from_config(MeshConfig())
    sharding = jax.sharding.NamedSharding(mesh, P())
    with Checkpointer(str(tmp_path / "c"), async_save=False) as ckpt:
        ckpt.save(1, _tiny_state(3.0), {"step": 1})
        state, _ = ckpt.restore(_tiny_state(0), shardings=sharding)
        assert state["w"].sharding == sharding
        state, _ = ckpt.restore(_tiny_state(0), shardings={"w": sharding})
        np.testing.assert_array_equal(state["w"], np.full((4,), 3.0, np.float32))
        with pytest.raises(ValueError, match="structure of `target`"):
            ckpt.restore(_tiny_state(0), shardings={"v": sharding})


def test_sharded_training_passes_gradient_accumulation_through():
    """On a 1-device mesh, 2 micro-batches give the update of the whole batch (`make_train_step`'s contract)."""
    model = MambaLM(SMALL)
    mesh = make_mesh_from_config(MeshConfig())
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 64, (4, 16)).astype(np.int32),
             "targets": rng.integers(0, 64, (4, 16)).astype(np.int32),
             "loss_mask": rng.random((4, 16)) < 0.5}
    results = []
    for k in (1, 2):
        training = sharded_training(model, make_optimizer(OptimizerConfig()), mesh, "dp", grad_accum_steps=k)
        state, metrics = training.train_step(training.init_state(jax.random.PRNGKey(0)), batch)
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        sharded_training(model, make_optimizer(OptimizerConfig()), mesh, "dp", grad_accum_steps=0)
    # the step really splits the batch: 3 micro-batches cannot divide 4 rows
    training = sharded_training(model, make_optimizer(OptimizerConfig()), mesh, "dp", grad_accum_steps=3)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        training.train_step(training.init_state(jax.random.PRNGKey(0)), batch)
