"""`mamba-jax` command line: `mamba-jax run <experiment> ...`, `mamba-jax bench <name> ...` and
`mamba-jax aot <experiment> --topology <tpu> ...` (compile for a TPU slice on this host).

Each experiment/benchmark is a module with `main(argv: list[str]) -> int` that parses its own options,
so `mamba-jax run lm --help` shows that experiment's options.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

EXPERIMENTS = {
    "lm": "experiments.lm.run",
    "icl": "experiments.icl.run",
}
BENCHMARKS = {
    "scan": "experiments.bench_scan.run",
    "hf": "experiments.bench_hf.run",
    "decode": "experiments.bench_models.decode",
    "prefill": "experiments.bench_models.prefill",
    "sharding": "experiments.bench_sharding.run",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
