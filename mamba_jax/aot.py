"""`mamba-jax aot`: compile the real sharded train step for a TPU topology on a CPU host.

    mamba-jax aot lm --topology v5e:16x16 [--size 1.4b] [--mesh data=-1,fsdp=16] [--strategy fsdp]
                     [--batch 256] [--seq-len 2048] [--compute-dtype bfloat16] [--remat] [--preset paper]
                     [key=value ...]

With the `tpu-aot` extra (libtpu), `jax.experimental.topologies` describes a TPU slice's devices on a
CPU host; the train step of `mamba_jax.sharding.sharded_training` (the one the experiments run) is
lowered and compiled for them — nothing is executed, no TPU is needed. Printed per configuration:
parameters, per-chip bytes (arguments, temporaries, outputs, generated code) against the chip's HBM,
the model FLOPs per step (6 · params · tokens) and the step time they need at the chip's peak, i.e. the
time at 100 % MFU (XLA's cost model gives no wall-clock estimate through a public API, so the MFU
column of the README is not claimed here), and XLA's own FLOP count (`cost_analysis()`, chips × one
device's share). XLA's count is not used for the time: on TPU it counts the matmul of a windowed-einsum
(collective-matmul) loop once rather than once per iteration, so it drops under fsdp + tensor (a 4-layer
d_model 768 Mamba on v5p:4x4x4: 7.98 TFLOP for fsdp=16,tensor=4 against 10.61 for fsdp=64, and 10.63 with
`LIBTPU_INIT_ARGS="--xla_tpu_enable_windowed_einsum_for_all_gather=false
--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Dict, Optional, Sequence

# Per-chip HBM (GiB) and dense bf16 peak (TFLOP/s), from the Cloud TPU documentation.
CHIPS = {
    "v4": dict(hbm_gib=32, peak_tflops=275),
    "v5e": dict(hbm_gib=16, peak_tflops=197),
    "v5p": dict(hbm_gib=95, peak_tflops=459),
    "v6e": dict(hbm_gib=32, peak_tflops=918),
}


def topology_devices(topology: str):
    """The devices of a TPU topology such as "v5e:2x2" or "v5p:4x4x4", described on this (CPU) host."""
    generation = topology.split(":", 1)[0]
    if generation not in CHIPS or ":" not in topology:
        raise ValueError(f"aot: `--topology` must look like <chip>:<shape> with chip one of {sorted(CHIPS)}, "
                         f"e.g. v5e:16x16; got {topology!r}")
    import os
    # libtpu takes a machine-wide lock unless told that several processes may load it (parallel tests,
    # a notebook beside a script); on a CPU host no TPU is opened, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu parses XLA_FLAGS itself and aborts the process on a flag it does not know; the XLA:CPU compiler's
    # own options (`--xla_cpu_*`, e.g. the test suite's) are such flags. A CPU backend already started has read
    # them, so dropping them here only keeps libtpu alive.
    flags = os.environ.get("XLA_FLAGS", "").split()
    if any(f.startswith("--xla_cpu_") for f in flags):
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_cpu_"))
    try:
        import libtpu  # noqa: F401
    except ImportError as error:
        raise RuntimeError("aot: compiling for TPU needs the optional dependency libtpu: "
                           "pip install -e '.[tpu-aot]'") from error
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def parse_mesh(text: str):
    """"data=-1,fsdp=16" -> MeshConfig(data=-1, fsdp=16)."""
    from mamba_jax.sharding.mesh import MESH_AXES, MeshConfig

    sizes = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"aot: `--mesh` items must be axis=size with axis one of {MESH_AXES}; got {item!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"aot: `--mesh` size of {name!r} must be an int; got {value!r}") from None
    return MeshConfig(**sizes)


@dataclasses.dataclass(frozen=True)
class AOTReport:
    """What compiling one sharded train step for a topology measured (bytes are per chip)."""

    topology: str
    mesh: str
    strategy: str
    params: int
    batch: int
    seq_len: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float
    peak_flops_per_chip: float
    chips: int

    @property
    def per_chip_bytes(self) -> int:
        """Live bytes during the step: arguments + temporaries + outputs not aliased to (donated) arguments
        + generated code."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def compile_oom(self) -> bool:
        """The TPU compiler refused the program (temporaries alone exceed HBM; nothing else measured)."""
        return math.isnan(self.flops)

    @property
    def fits(self) -> bool:
        return self.per_chip_bytes <= self.hbm_bytes

    @property
    def model_flops(self) -> float:
        """6 · params · tokens: the step's model FLOPs as MFU counts them (forward + backward of every
        parameter once per token; remat's recomputation and the scan's O(d_state) work not counted)."""
        return 6.0 * self.params * self.batch * self.seq_len

    @property
    def seconds_at_peak(self) -> float:
        """The step time at 100 % MFU: model FLOPs / (chips · peak). (Not XLA's count: on TPU it counts a
        windowed-einsum loop's matmul once, not once per iteration, so it shrinks under fsdp + tensor.)"""
        return self.model_flops / (self.chips * self.peak_flops_per_chip)

    def row(self) -> Dict[str, Any]:
        gib = 2 ** 30
        return {"topology": self.topology, "mesh": self.mesh, "strategy": self.strategy,
                "params": f"{self.params / 1e9:.2f}B" if self.params >= 1e9 else f"{self.params / 1e6:.1f}M",
                "batch × seq": f"{self.batch} × {self.seq_len}",
                "args GiB/chip": round(self.argument_bytes / gib, 3), "temp GiB/chip": round(self.temp_bytes / gib, 3),
                "total GiB/chip": round(self.per_chip_bytes / gib, 3), "HBM GiB": round(self.hbm_bytes / gib),
                "fits": "yes" if self.fits else ("NO (compile-time OOM)" if self.compile_oom else "NO"),
                "6·N·T TFLOP": round(self.model_flops / 1e12, 2), "XLA TFLOP/step": round(self.flops / 1e12, 2),
                "ms at 100% MFU": round(1e3 * self.seconds_at_peak, 1)}


def compile_train_step(model, tx, topology: str, mesh_config, strategy: str, batch: int, seq_len: int) -> AOTReport:
    """Lower and compile `sharded_training(model, tx, mesh, strategy)`'s train step for `topology`."""
    import jax
    import jax.numpy as jnp

    from mamba_jax.sharding.mesh import make_mesh_from_config
    from mamba_jax.sharding.rules import check_batch
    from mamba_jax.train import sharded_training

    devices = topology_devices(topology)
    mesh = make_mesh_from_config(mesh_config, devices)
    training = sharded_training(model, tx, mesh, strategy)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=training.batch_sharding)
    abstract_batch = {"inputs": tokens, "targets": tokens,
                      "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=training.batch_sharding)}
    check_batch(abstract_batch, mesh, training.rules)
    return compile_report(training.train_step.jitted, (training.abstract_state, abstract_batch), topology, mesh,
                          strategy, _param_count(training.abstract_state.params), batch, seq_len)


def _param_count(params) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def compile_report(jitted, abstract_args, topology: str, mesh, strategy: str, params: int, batch: int,
                   seq_len: int) -> AOTReport:
    """Lower `jitted` on `abstract_args` (ShapeDtypeStructs with shardings on `mesh`) with the mesh in
    context, compile it for `topology` and measure it (a compile-time OOM is reported, not raised)."""
    import jax

    chip = CHIPS[topology.split(":", 1)[0]]
    common = dict(topology=topology, mesh=",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 chip",
                  strategy=strategy, params=params, batch=batch, seq_len=seq_len, hbm_bytes=chip["hbm_gib"] * 2 ** 30,
                  peak_flops_per_chip=chip["peak_tflops"] * 1e12, chips=mesh.devices.size)
    try:
        with jax.set_mesh(mesh):      # Pallas kernels run per shard (`mamba_jax.sharding.kernels`)
            compiled = jitted.lower(*abstract_args).compile()
    except jax.errors.JaxRuntimeError as error:
        temp = compile_time_oom_bytes(str(error))
        if temp is None:
            raise
        # the TPU compiler refuses programs that cannot fit: report what it needed instead of failing
        return AOTReport(**common, argument_bytes=0, temp_bytes=temp, output_bytes=0, alias_bytes=0, code_bytes=0,
                         flops=float("nan"))
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # cost_analysis of an SPMD program counts one device's share; the whole step is chips × that
    return AOTReport(
        **common, argument_bytes=int(memory.argument_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)) * mesh.devices.size)


def compile_m1_steps(preset: str, topology: str, mesh_config, strategy: str, batch: Optional[int] = None,
                     seq_len: Optional[int] = None, compute_dtype: str = "bfloat16",
                     overrides: Optional[Dict[str, str]] = None) -> Dict[str, AOTReport]:
    """The M1 experiment's two heavy steps (`experiments.m1`) compiled for `topology`: "distill" (the
    student's reverse-KL step with the teacher's forward live, teacher parameters sharded like the
    student's) and "grpo" (the GRPO update on `batch` rollouts of a prompt of `seq_len` // 4 tokens and a
    completion of the rest). Parameters float32, compute `compute_dtype`, AdamW state. The 6·N·T column
    counts the student (N: its parameters); distillation also runs the teacher's forward, ~2·N_teacher·T."""
    import jax
    import jax.numpy as jnp

    from experiments.lm.config import apply_overrides
    from experiments.m1.config import preset_config
    from experiments.m1.run import teacher_model
    from mamba_jax.distill.attention_init import mamba1_student_config, mamba2_student_config
    from mamba_jax.distill.train import STAGE2_KD, make_kd_train_step
    from mamba_jax.models import HybridLM
    from mamba_jax.rl import GRPOConfig, make_grpo_step
    from mamba_jax.sharding.mesh import make_mesh_from_config
    from mamba_jax.sharding.rules import replicated
    from mamba_jax.train import sharded_training
    from mamba_jax.train.optim import OptimizerConfig, make_optimizer

    config = apply_overrides(preset_config(preset), overrides or {})
    batch, seq_len = batch or config.batch_size, seq_len or config.seq_len
    teacher = teacher_model(config)
    teacher = type(teacher)(teacher.config.replace(dtype=compute_dtype))
    if config.mamba_form == "mamba1":
        hybrid = mamba1_student_config(teacher.config, config.replaced_layers, d_state=config.d_state, bias=True)
    else:
        hybrid = mamba2_student_config(teacher.config, config.replaced_layers, chunk_size=min(256, seq_len))
    student = HybridLM(hybrid)
    mesh = make_mesh_from_config(mesh_config, topology_devices(topology))
    tx = make_optimizer(OptimizerConfig())
    trained = sharded_training(student, tx, mesh, strategy)
    frozen = sharded_training(teacher, tx, mesh, strategy)
    state_sh = jax.tree_util.tree_map(lambda a: a.sharding, trained.abstract_state)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=trained.batch_sharding)  # noqa: E731
    repl = replicated(mesh)
    reports = {}
    kd = make_kd_train_step(teacher.apply, STAGE2_KD, donate=False)
    kd_batch = {"inputs": rows((batch, seq_len), jnp.int32), "targets": rows((batch, seq_len), jnp.int32),
                "loss_mask": rows((batch, seq_len), jnp.bool_)}
    kd_jit = jax.jit(kd, in_shardings=(state_sh, frozen.param_shardings, trained.batch_sharding),
                     out_shardings=(state_sh, repl))
    n_params = _param_count(trained.abstract_state.params)
    reports["distill"] = compile_report(kd_jit, (trained.abstract_state, frozen.abstract_state.params, kd_batch),
                                        topology, mesh, strategy, n_params, batch, seq_len)
    prompt = max(1, seq_len // 4)
    t = seq_len - prompt
    grpo = make_grpo_step(GRPOConfig(max_new_tokens=t))
    grpo_batch = {"prompt_ids": rows((batch, prompt), jnp.int32), "prompt_mask": rows((batch, prompt), jnp.int32),
                  "completion_ids": rows((batch, t), jnp.int32), "completion_mask": rows((batch, t), jnp.bool_),
                  "old_logp": rows((batch, t), jnp.float32), "advantages": rows((batch,), jnp.float32)}
    grpo_jit = jax.jit(grpo, in_shardings=(state_sh, trained.batch_sharding), out_shardings=(state_sh, repl))
    reports["grpo"] = compile_report(grpo_jit, (trained.abstract_state, grpo_batch), topology, mesh, strategy,
                                     n_params, batch, seq_len)
    return reports


def compile_time_oom_bytes(message: str):
    """The temporaries (bytes) of a TPU "CompileTimeHbmOom" error message, e.g. "... HLO temporaries
    (38.41G) exceeds available HBM (15.75G)" -> 38.41 GiB; None for other errors."""
    import re

    if "CompileTimeHbmOom" not in message and "Ran out of memory" not in message:
        return None
    found = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", message)
    if not found:
        return None
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def _lm_model(preset: str, size: Optional[str], compute_dtype: str, overrides: Dict[str, str], remat: bool = False):
    """(model, tx, batch, seq_len) of `mamba-jax run lm`'s config, the model optionally a named Mamba size
    (`mamba_jax.models.sizes`)."""
    from experiments.lm.config import apply_overrides, preset_config
    from mamba_jax.models import MambaLM, mamba_config
    from mamba_jax.train.optim import make_optimizer

    from mamba_jax.ops import resolve_impl

    config = apply_overrides(preset_config(preset), overrides)
    # "auto" resolved for the target (a TPU: the Pallas kernels), not for this host
    scan_impl = resolve_impl(config.scan_impl, config.seq_len, backend="tpu")
    if size is None:
        model_config = config.model_config().replace(dtype=compute_dtype, remat=remat, scan_impl=scan_impl)
    else:
        model_config = mamba_config(size, dtype=compute_dtype, param_dtype="float32", scan_impl=scan_impl,
                                    remat=remat)
    return MambaLM(model_config), make_optimizer(config.optimizer_config()), config.batch_size, config.seq_len


# `mamba-jax aot moe_mamba` presets (batch, seq_len, moe_mamba_config keywords) and the typed overrides
_MOE_PRESETS = {
    "smoke": (8, 64, dict(setting="25m", d_model=32, n_blocks=2, n_experts=4, vocab_size=256)),
    "cpu": (16, 256, dict(setting="25m", d_model=128, n_blocks=4, n_experts=8, vocab_size=259)),
    "paper": (256, 1024, dict(setting="100m", vocab_size=50_280)),
}
_MOE_KEYS = {"setting": str, "d_model": int, "n_blocks": int, "n_experts": int, "router": str,
             "capacity_factor": float, "dispatch": str, "vocab_size": int, "d_state": int, "expand": int}


def _moe_mamba_model(preset: str, size: Optional[str], compute_dtype: str, overrides: Dict[str, str],
                     remat: bool = False):
    """(model, tx, batch, seq_len) of a MoE-Mamba (`mamba_jax.models.moe_mamba`): the preset's setting
    with `key=value` overrides of `moe_mamba_config`'s keywords (typed; unknown keys rejected)."""
    from mamba_jax.models.hybrid import HybridLM
    from mamba_jax.models.moe_mamba import moe_mamba_config
    from mamba_jax.train.optim import OptimizerConfig, make_optimizer

    if size is not None:
        raise ValueError("aot moe_mamba: `--size` names Mamba sizes; set setting=25m|100m, d_model=..., "
                         "n_blocks=..., n_experts=... instead")
    batch, seq_len, kwargs = _MOE_PRESETS[preset]
    kwargs = dict(kwargs)
    for key, text in overrides.items():
        if key not in _MOE_KEYS:
            raise ValueError(f"aot moe_mamba: unknown key `{key}`; valid keys: {', '.join(sorted(_MOE_KEYS))}")
        try:
            kwargs[key] = _MOE_KEYS[key](text)
        except ValueError:
            raise ValueError(f"aot moe_mamba: `{key}` expects {_MOE_KEYS[key].__name__}; got {text!r}") from None
    setting = kwargs.pop("setting")
    config = moe_mamba_config(setting, dtype=compute_dtype, param_dtype="float32", remat=remat, **kwargs)
    return HybridLM(config), make_optimizer(OptimizerConfig()), batch, seq_len


EXPERIMENTS = {"lm": _lm_model, "moe_mamba": _moe_mamba_model, "m1": None}   # m1: compile_m1_steps


def main(argv: Optional[Sequence[str]] = None) -> int:
    from experiments.lm.config import parse_overrides
    from mamba_jax.bench_utils import markdown_table
    from mamba_jax.models.sizes import MAMBA_SIZES

    parser = argparse.ArgumentParser(prog="mamba-jax aot", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:16x16, v5p:4x4x4")
    parser.add_argument("--mesh", default="data=-1", help="axis sizes, e.g. data=-1,fsdp=16 (-1: the rest)")
    parser.add_argument("--strategy", default="fsdp", choices=("dp", "fsdp", "tensor", "fsdp_tensor"))
    parser.add_argument("--size", default=None, choices=tuple(MAMBA_SIZES), help="a named Mamba size")
    parser.add_argument("--preset", default="paper", choices=("smoke", "cpu", "paper"))
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
    args, rest = parser.parse_known_args(list(argv or []))
    if args.experiment == "m1":
        try:
            reports = compile_m1_steps(args.preset, args.topology, parse_mesh(args.mesh), args.strategy, args.batch,
                                       args.seq_len, args.compute_dtype, parse_overrides(rest))
        except ValueError as error:
            parser.error(str(error))
        rows = [{"step": name, **r.row()} for name, r in reports.items()]
        print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
        return 0
    try:
        model, tx, batch, seq_len = EXPERIMENTS[args.experiment](args.preset, args.size, args.compute_dtype,
                                                                 parse_overrides(rest), args.remat)
        report = compile_train_step(model, tx, args.topology, parse_mesh(args.mesh), args.strategy,
                                    args.batch or batch, args.seq_len or seq_len)
    except ValueError as error:
        parser.error(str(error))
    row = report.row()
    print(markdown_table(list(row), [list(row.values())]))
    return 0
