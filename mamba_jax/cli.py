"""`mamba-jax` command line: `mamba-jax run <experiment> ...`, `mamba-jax bench <name> ...` and
`mamba-jax aot <experiment> --topology <tpu> ...` (compile for a TPU slice on this host).

Each experiment/benchmark is a module with `main(argv: list[str]) -> int` that parses its own options,
so `mamba-jax run lm --help` shows that experiment's options.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys
from typing import Optional, Sequence

EXPERIMENTS = {
    "lm": "experiments.lm.run",
    "icl": "experiments.icl.run",
    "pkd": "experiments.pkd.run",
    "moe_mamba": "experiments.moe_mamba.run",
    "m1": "experiments.m1.run",
    "m2r2": "experiments.m2r2.run",
    "selective_copy": "experiments.selective_copy.run",
}
BENCHMARKS = {
    "scan": "experiments.bench_scan.run",
    "hf": "experiments.bench_hf.run",
    "decode": "experiments.bench_models.decode",
    "prefill": "experiments.bench_models.prefill",
    "generate": "experiments.bench_models.generate",
    "speculative": "experiments.bench_models.speculative",
    "sharding": "experiments.bench_sharding.run",
    "kernels": "experiments.bench_kernels.run",
    "moe": "experiments.bench_moe.run",
}


def skip_absent_tpu(environ=os.environ, device_nodes=None) -> bool:
    """Set JAX_PLATFORMS=cpu when libtpu is installed (the `tpu-aot` extra) but this host has no
    accelerator, so that jax does not try to open a TPU and print libtpu's initialisation errors.

    Left alone: an explicit JAX_PLATFORMS, hosts with TPU (/dev/accel*, /dev/vfio/<n>) or GPU
    (/dev/nvidia*, /dev/kfd) device nodes, and hosts without libtpu. TPU topologies for `mamba-jax aot`
    are described by libtpu either way. Returns whether it set the variable.
    """
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    if device_nodes is None:
        device_nodes = [p for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia*", "/dev/kfd")
                        for p in glob.glob(pattern)]
    if device_nodes:
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    if environ is os.environ and "jax" in sys.modules:  # imported already: the env var is read at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()
    parser = argparse.ArgumentParser(prog="mamba-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment", add_help=False)
    run.add_argument("name", choices=sorted(EXPERIMENTS))
    bench = sub.add_parser("bench", help="run a benchmark", add_help=False)
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    sub.add_parser("aot", help="compile an experiment's sharded train step for a TPU topology", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "aot":
        from mamba_jax import aot
        return int(aot.main(rest) or 0)
    table = EXPERIMENTS if args.command == "run" else BENCHMARKS
    module = importlib.import_module(table[args.name])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
