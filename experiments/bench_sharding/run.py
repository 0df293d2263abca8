"""`mamba-jax bench sharding`: tokens/s of the sharded train step on 1 device vs N fake CPU devices.

One MambaLM trained with AdamW (`make_optimizer(OptimizerConfig())`) through `sharded_training`, the
same global batch for every run: first on a 1-device mesh (the baseline), then on N fake CPU devices
(`--xla_force_host_platform_device_count=N`) under each strategy — dp (data=N), fsdp (fsdp=N), tensor
(data=N/T, tensor=T) and fsdp_tensor (fsdp=N/T, tensor=T), T = `--tensor` (default 4; N // 2 below 8
devices). The first step (compilation) is excluded; tokens/s = batch · seq_len / the median time of
`--steps` timed steps. Ratios are against the 1-device run of the same invocation.

Fake CPU devices share the machine's cores, so the ratios measure partitioning overhead (collectives,
resharding, smaller per-device kernels), not speed-up: on P physical cores the ideal is at most about
P x (and XLA's CPU backend already uses several cores for one device).

The device count must be fixed before jax is imported, and `mamba-jax` may already have imported it, so
`main` re-runs this module in a subprocess with XLA_FLAGS (and JAX_PLATFORMS=cpu) set.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from typing import Optional, Sequence

_CHILD_ENV = "MAMBA_JAX_BENCH_SHARDING_CHILD"
STRATEGIES = ("dp", "fsdp", "tensor", "fsdp_tensor")
FOOTER = ("Note: the {n} devices are fake CPU devices sharing the same physical cores, so the ratios measure "
          "partitioning overhead (collectives, resharding, smaller per-device work), not speed-up; on {cores} "
          "core(s) the ideal is at most about {cores}x.")


def parse_args(argv: Optional[Sequence[str]]):
    parser = argparse.ArgumentParser(prog="mamba-jax bench sharding", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices for the sharded runs")
    parser.add_argument("--tensor", type=int, default=None,
                        help="tensor-parallel axis size T of tensor / fsdp_tensor (default 4 on >= 8 devices, else "
                             "devices // 2)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"subset of {STRATEGIES}")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps (median), after 1 warm-up step")
    parser.add_argument("--batch", type=int, default=16, help="global batch (same for every run)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--scan-impl", default="auto", help="Mamba-1 scan implementation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tensor is None:
        args.tensor = 4 if args.devices >= 8 else max(1, args.devices // 2)
    for name in ("devices", "tensor", "steps", "batch", "seq_len", "d_model", "n_layer", "d_state", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = sorted(set(args.strategies) - set(STRATEGIES))
    if bad or not args.strategies:
        parser.error(f"--strategies: unknown {bad}; choose from {STRATEGIES}")
    uses_tensor = any(s in ("tensor", "fsdp_tensor") for s in args.strategies)
    if uses_tensor and (args.tensor > args.devices or args.devices % args.tensor):
        parser.error(f"--tensor {args.tensor} must divide --devices {args.devices}")
    dp_extent = args.devices if {"dp", "fsdp"} & set(args.strategies) else args.devices // args.tensor
    if args.batch % dp_extent:
        parser.error(f"--batch {args.batch} must be divisible by the data-parallel devices ({dp_extent})")
    return args


def mesh_configs(args):
    """strategy -> MeshConfig on `args.devices` devices."""
    from mamba_jax.sharding import MeshConfig
    n, t = args.devices, args.tensor
    configs = dict(dp=MeshConfig(data=n), fsdp=MeshConfig(fsdp=n), tensor=MeshConfig(data=n // t, tensor=t),
                   fsdp_tensor=MeshConfig(fsdp=n // t, tensor=t))
    return {s: configs[s] for s in args.strategies}


def measure(model, tx, mesh, strategy: str, batch, steps: int, seed: int):
    """(median seconds per train step after one warm-up step, last loss)."""
    import jax

    from mamba_jax.bench_utils import time_call
    from mamba_jax.train import sharded_training

    tr = sharded_training(model, tx, mesh, strategy, seq_len=batch["inputs"].shape[1])
    state = tr.init_state(jax.random.PRNGKey(seed))
    batch = tr.shard_batch(batch)
    carry = {"state": state, "metrics": None}

    def step():
        carry["state"], carry["metrics"] = tr.train_step(carry["state"], batch)
        return carry["state"], carry["metrics"]

    _, seconds = time_call(step, repeats=steps, warmup=1)
    return seconds, float(carry["metrics"]["loss"])


def bench(args):
    import jax
    import numpy as np

    from mamba_jax.models import MambaConfig, MambaLM
    from mamba_jax.sharding import MeshConfig, make_mesh_from_config
    from mamba_jax.train import OptimizerConfig, make_optimizer

    devices = jax.devices()
    if len(devices) < args.devices:
        raise SystemExit(f"bench sharding: {args.devices} devices requested, {len(devices)} available "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    model = MambaLM(MambaConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer,
                                d_state=args.d_state, scan_impl=args.scan_impl))
    tx = make_optimizer(OptimizerConfig())
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.seq_len)
    batch = dict(inputs=rng.integers(0, args.vocab_size, shape).astype(np.int32),
                 targets=rng.integers(0, args.vocab_size, shape).astype(np.int32),
                 loss_mask=np.ones(shape, bool))
    tokens = args.batch * args.seq_len
    runs = [("1 device", "dp", MeshConfig(), devices[:1])]
    runs += [(s, s, cfg, devices[:args.devices]) for s, cfg in mesh_configs(args).items()]
    results = []
    for name, strategy, cfg, devs in runs:
        mesh = make_mesh_from_config(cfg, devices=devs)
        seconds, loss = measure(model, tx, mesh, strategy, batch, args.steps, args.seed)
        sizes = ", ".join(f"{a}={n}" for a, n in zip(mesh.axis_names, mesh.devices.shape) if n > 1) or "-"
        results.append(dict(run=name, devices=len(devs), mesh=sizes, seconds=seconds,
                            tokens_per_s=tokens / seconds, loss=loss))
        print(f"  {name}: {tokens / seconds:.4g} tokens/s", file=sys.stderr, flush=True)
    return results


def child_main(args) -> int:
    from mamba_jax.bench_utils import hardware_description, markdown_table

    results = bench(args)
    base = results[0]["tokens_per_s"]
    rows = [[r["run"], r["devices"], r["mesh"], r["seconds"] * 1e3, round(r["tokens_per_s"]), r["tokens_per_s"] / base,
             r["loss"]] for r in results]
    print(f"sharding benchmark: MambaLM d_model {args.d_model}, n_layer {args.n_layer}, d_state {args.d_state}, "
          f"vocab {args.vocab_size}; AdamW; global batch {args.batch} x seq_len {args.seq_len}; "
          f"median of {args.steps} steps after 1 warm-up step; float32")
    print(hardware_description())
    print(markdown_table(["run", "devices", "mesh", "ms / step", "tokens / s", "ratio vs 1 device", "loss"], rows))
    print(FOOTER.format(n=args.devices, cores=os.cpu_count()))
    if not all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
               for r in results):
        print("error: a non-finite or non-positive measurement", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.environ.get(_CHILD_ENV) == "1":
        return child_main(args)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"},
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"]),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-m", "experiments.bench_sharding.run", *argv], env=env, cwd=root,
                         stdout=subprocess.PIPE, text=True)
    sys.stdout.write(out.stdout)   # through sys.stdout, so callers (and pytest's capsys) see the table
    sys.stdout.flush()
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
