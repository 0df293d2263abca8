"""`mamba-jax aot`: the sharded train step compiles for a TPU topology on this CPU host (libtpu), and the
compiled program's numbers are consistent with the model (parameter count, FLOPs ≈ 6·N·tokens,
sharded strategies hold fewer bytes per chip than data parallelism)."""
import math
import os

import jax
import jax.numpy as jnp
import pytest

from mamba_jax import aot
from mamba_jax.cli import main as cli_main
from mamba_jax.models import MambaConfig, MambaLM
from mamba_jax.train.optim import OptimizerConfig, make_optimizer


def test_parse_mesh_and_bad_topologies():
    mesh = aot.parse_mesh("data=-1,fsdp=16")
    assert (mesh.data, mesh.fsdp, mesh.tensor) == (-1, 16, 1)
    with pytest.raises(ValueError, match="--mesh"):
        aot.parse_mesh("model=4")
    with pytest.raises(ValueError, match="--mesh"):
        aot.parse_mesh("data=two")
    with pytest.raises(ValueError, match="--topology"):
        aot.topology_devices("h100:8")


def test_topology_devices_drops_the_cpu_compilers_flags_that_would_abort_libtpu(monkeypatch):
    """libtpu aborts the process on an XLA flag it does not know, such as XLA:CPU's `--xla_cpu_*` options
    (which `tests/conftest.py` sets); the others stay."""
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
    assert len(aot.topology_devices("v5e:2x2")) == 4
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=0"


@pytest.fixture(scope="module")
def reports():
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    # d_model 128 (d_inner 256): a tensor shard's last dimension (d_inner / 2) fills the 128 TPU lanes; at
    # d_model 64 each shard pads 64 -> 128 lanes and the split does not show in argument bytes
    model = MambaLM(MambaConfig(vocab_size=64, d_model=128, n_layer=2, d_state=8, dtype="bfloat16"))
    tx = make_optimizer(OptimizerConfig())
    meshes = {"dp": "data=4", "fsdp": "fsdp=4", "tensor": "data=2,tensor=2"}
    return model, {s: aot.compile_train_step(model, tx, "v5e:2x2", aot.parse_mesh(m), s, 8, 64)
                   for s, m in meshes.items()}


def test_compiles_for_v5e_2x2_with_every_strategy(reports):
    model, by_strategy = reports
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    for strategy, report in by_strategy.items():
        assert report.chips == 4 and report.params == n_params, strategy
        # forward + backward ≈ 6 FLOPs per parameter per token (plus the scan and attention-free extras)
        assert 0.8 < report.flops / (6 * n_params * 8 * 64) < 2.0, (strategy, report.flops)
        assert report.fits and report.per_chip_bytes > 0
    # parameters and Adam moments are split 4 ways under FSDP, 2 ways under tensor parallelism
    assert by_strategy["fsdp"].argument_bytes < 0.5 * by_strategy["dp"].argument_bytes
    assert by_strategy["tensor"].argument_bytes < 0.8 * by_strategy["dp"].argument_bytes


def test_cli_prints_the_table(capsys):
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    assert cli_main(["aot", "lm", "--topology", "v5e:2x2", "--preset", "smoke", "--mesh", "data=2,fsdp=2"]) == 0
    out = capsys.readouterr().out
    assert "| topology |" in out and "| v5e:2x2 | data=2,fsdp=2 | fsdp |" in out


def test_cli_names_a_mesh_that_does_not_match_the_topology(capsys):
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    with pytest.raises(SystemExit):
        cli_main(["aot", "lm", "--topology", "v5e:2x2", "--preset", "smoke", "--mesh", "data=3"])
    assert "`data`" in capsys.readouterr().err


def test_compile_time_oom_message_is_parsed():
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
               "for HLO temporaries (38.41G) exceeds available HBM (15.75G). HLO module: jit_train_step.")
    assert aot.compile_time_oom_bytes(message) == int(38.41 * 2 ** 30)
    assert aot.compile_time_oom_bytes("INVALID_ARGUMENT: something else") is None


def test_mamba_train_step_with_pallas_kernels_compiles_per_shard_for_v5e_2x2():
    """impl="pallas" in a sharded train step: GSPMD cannot partition a Mosaic call, so the scan runs in
    shard_map (batch over data, channels over tensor); the TPU program holds the compiled kernels (a
    tpu_custom_call per layer for the forward and one for the backward), not interpreted ones."""
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    from mamba_jax.sharding.mesh import make_mesh_from_config
    from mamba_jax.train import sharded_training

    n_layer = 2
    model = MambaLM(MambaConfig(vocab_size=64, d_model=64, n_layer=n_layer, d_state=8, dtype="bfloat16",
                                scan_impl="pallas"))
    tx = make_optimizer(OptimizerConfig())
    mesh = make_mesh_from_config(aot.parse_mesh("data=2,tensor=2"), aot.topology_devices("v5e:2x2"))
    training = sharded_training(model, tx, mesh, "tensor")
    tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=training.batch_sharding)
    batch = {"inputs": tokens, "targets": tokens,
             "loss_mask": jax.ShapeDtypeStruct((8, 64), jnp.bool_, sharding=training.batch_sharding)}
    text = training.train_step.jitted.lower(training.abstract_state, batch).compile().as_text()
    assert text.count("tpu_custom_call") >= 2 * n_layer


@pytest.mark.parametrize("strategy,mesh_text", [("tensor", "data=2,tensor=2"), ("fsdp", "fsdp=4")])
def test_mamba2_train_step_with_pallas_ssd_compiles_per_shard_for_v5e_2x2(strategy, mesh_text):
    """scan_impl="pallas" in a sharded Mamba-2 train step: the SSD kernels run in shard_map (rows over the
    data axes, heads over tensor) and the TPU program holds the Mosaic kernels: at least a forward and a
    backward per layer (with `scan_impl="chunked"` there are none)."""
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    from mamba_jax.models import Mamba2Config, Mamba2LM
    from mamba_jax.sharding.mesh import make_mesh_from_config
    from mamba_jax.train import sharded_training

    n_layer = 2
    model = Mamba2LM(Mamba2Config(vocab_size=64, d_model=64, n_layer=n_layer, d_state=16, head_dim=32,
                                  dtype="bfloat16", scan_impl="pallas"))
    tx = make_optimizer(OptimizerConfig())
    mesh = make_mesh_from_config(aot.parse_mesh(mesh_text), aot.topology_devices("v5e:2x2"))
    training = sharded_training(model, tx, mesh, strategy)
    tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=training.batch_sharding)
    batch = {"inputs": tokens, "targets": tokens,
             "loss_mask": jax.ShapeDtypeStruct((8, 64), jnp.bool_, sharding=training.batch_sharding)}
    text = training.train_step.jitted.lower(training.abstract_state, batch).compile().as_text()
    assert text.count("tpu_custom_call") >= 2 * n_layer


def test_cli_compiles_moe_mamba_with_expert_parallelism(capsys):
    pytest.importorskip("libtpu", reason="needs the optional dependency libtpu (the tpu-aot / test extra)")
    assert cli_main(["aot", "moe_mamba", "--topology", "v5e:2x2", "--preset", "smoke", "--mesh", "data=2,expert=2",
                     "--strategy", "fsdp", "n_experts=4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| v5e:2x2 |"))
    assert "| data=2,expert=2 | fsdp |" in row and "| yes |" in row
    with pytest.raises(SystemExit):                      # 6 experts do not divide over an expert axis of 4
        cli_main(["aot", "moe_mamba", "--topology", "v5e:2x2", "--preset", "smoke", "--mesh", "expert=4",
                  "n_experts=6"])
    assert "n_experts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["aot", "moe_mamba", "--topology", "v5e:2x2", "--preset", "smoke", "experts=4"])
    assert "unknown key `experts`" in capsys.readouterr().err


def test_lm_scan_impl_auto_resolves_for_the_tpu_target():
    """On this CPU host "auto" would mean the CPU's `chunked`; `mamba-jax aot` compiles for a TPU, so its
    model runs the Pallas (Mosaic) kernels, and an explicit impl is kept."""
    from mamba_jax.aot import _lm_model

    assert _lm_model("smoke", None, "bfloat16", {})[0].config.scan_impl == "pallas"
    assert _lm_model("smoke", None, "bfloat16", {"scan_impl": "chunked_associative"})[0].config.scan_impl == \
        "chunked_associative"


def test_step_time_at_peak_uses_model_flops_not_xla_count():
    # 1e9 params, 256 × 2048 tokens, 64 chips of 459 TFLOP/s: 6 · 1e9 · 524288 / (64 · 459e12) s
    report = aot.AOTReport(topology="v5p:4x4x4", mesh="fsdp=64", strategy="fsdp", params=10 ** 9, batch=256,
                           seq_len=2048, argument_bytes=1, temp_bytes=2, output_bytes=3, alias_bytes=3, code_bytes=4,
                           hbm_bytes=95 * 2 ** 30, flops=1.0e15, peak_flops_per_chip=459e12, chips=64)
    assert report.model_flops == 6 * 10 ** 9 * 256 * 2048
    assert math.isclose(report.seconds_at_peak, 3.145728e15 / (64 * 459e12))
    row = report.row()
    assert row["6·N·T TFLOP"] == 3145.73 and row["XLA TFLOP/step"] == 1000.0
    assert row["ms at 100% MFU"] == round(1e3 * 3.145728e15 / (64 * 459e12), 1)


def test_m1_distillation_and_grpo_steps_compile_for_v5e_2x2():
    reports = aot.compile_m1_steps("smoke", "v5e:2x2", aot.parse_mesh("data=2,fsdp=2"), "fsdp")
    assert set(reports) == {"distill", "grpo"}
    for name, report in reports.items():
        assert report.fits and report.flops > 0 and report.chips == 4, name
    # the distillation step also holds the teacher's parameters (float32, sharded like the student's)
    assert reports["distill"].argument_bytes > reports["grpo"].argument_bytes
