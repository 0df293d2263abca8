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


def accelerator_device_nodes() -> list:
    """This host's TPU (/dev/accel*, /dev/vfio/<n>) and GPU (/dev/nvidia*, /dev/kfd) device nodes."""
    patterns = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia*", "/dev/kfd")
    return [path for pattern in patterns for path in glob.glob(pattern)]


def skip_absent_tpu(environ=os.environ, device_nodes=None) -> bool:
    """Set JAX_PLATFORMS=cpu when libtpu is installed (the `tpu-aot` extra) but this host has no
    accelerator, so that jax does not try to open a TPU and print libtpu's initialisation errors.

    Left alone: an explicit JAX_PLATFORMS, hosts with TPU (/dev/accel*, /dev/vfio/<n>) or GPU
    (/dev/nvidia*, /dev/kfd) device nodes, and hosts without libtpu. TPU topologies for `mamba-jax aot`
    are described by libtpu either way. Returns whether it set the variable.
    """
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    if accelerator_device_nodes() if device_nodes is None else device_nodes:
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    if environ is os.environ and "jax" in sys.modules:  # imported already: the env var is read at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


# glibc's malloc tunables (GLIBC_TUNABLES, for child processes) and their mallopt numbers (malloc.h)
REUSE_FREED_MEMORY = {"glibc.malloc.arena_max": (-8, 1), "glibc.malloc.mmap_max": (-4, 0),
                      "glibc.malloc.trim_threshold": (-1, 2**31 - 1)}


def reuse_freed_host_memory(environ=os.environ, device_nodes=None, mallopt=None) -> bool:
    """On a host without accelerators, make glibc's malloc keep freed memory for reuse instead of returning it
    to the kernel: one arena, no mmap, no trimming (`REUSE_FREED_MEMORY`), in this process (mallopt) and in its
    children (GLIBC_TUNABLES).

    Why: XLA:CPU allocates each execution's temporaries as one block, from the arena of the worker thread that
    runs it. glibc serves a block over 32 MB (over 64 MB in a thread's arena) with a fresh mmap and unmaps it on
    free, so every step of a training loop faults its temporaries in again page by page. The ICL `cpu_long`
    Mamba step (125 MB of temporaries) took 32k minor page faults per step and ~17 % of its CPU time in the
    kernel (README, "Host memory on CPU"). The cost: the process keeps its peak heap until it exits.

    Left alone: hosts with accelerator device nodes, a JAX_PLATFORMS naming another platform, a GLIBC_TUNABLES
    that sets any glibc.malloc tunable (the way to opt out or choose other values), and C libraries without
    `mallopt`. Call it before jax starts its CPU backend: the backend's threads pick their arena at their first
    malloc. `mallopt(param, value) -> int` is for tests. Returns whether it changed the policy.
    """
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and set(platforms.lower().split(",")) != {"cpu"}:
        return False
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    if accelerator_device_nodes() if device_nodes is None else device_nodes:
        return False
    if mallopt is None:
        import ctypes
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            return False
    if not all(mallopt(param, value) == 1 for param, value in REUSE_FREED_MEMORY.values()):
        return False
    tunables = ":".join(f"{name}={value}" for name, (_, value) in REUSE_FREED_MEMORY.items())
    environ["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), tunables]))
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()
    reuse_freed_host_memory()
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
