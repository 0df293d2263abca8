"""`mamba-jax bench scan`: every selective-scan implementation against `reference` in one run.

For each length: forward and forward+backward time (median of repeats, compilation excluded), the ratio
to `reference` measured in the same run, and the compiled temporary memory of forward+backward
(XLA's `memory_analysis().temp_size_in_bytes`: the peak scratch memory of the compiled program).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from mamba_jax.bench_utils import hardware_description, markdown_table, time_call
from mamba_jax.ops import IMPLS, resolve_impl, selective_scan


def make_inputs(b: int, l: int, d: int, n: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    return dict(
        u=jax.random.normal(keys[0], (b, l, d)),
        dt=jax.random.normal(keys[1], (b, l, d)) * 0.5,
        A=-jnp.exp(jax.random.normal(keys[2], (d, n)) * 0.5),
        B=jax.random.normal(keys[3], (b, l, n)),
        C=jax.random.normal(keys[4], (b, l, n)),
    )


def build(impl: str, chunk_size: int):
    fwd = jax.jit(lambda a: selective_scan(**a, dt_softplus=True, impl=impl, chunk_size=chunk_size))
    loss = lambda a: jnp.sum(selective_scan(**a, dt_softplus=True, impl=impl, chunk_size=chunk_size) ** 2)
    fwd_bwd = jax.jit(jax.grad(loss))
    return fwd, fwd_bwd


def bench_length(l: int, args, impls: Sequence[str], chunk_size: int, repeats: int):
    inputs = make_inputs(args.batch, l, args.d, args.n)
    rows = {}
    for impl in impls:
        fwd, fwd_bwd = build(impl, chunk_size)
        _, t_fwd = time_call(lambda: fwd(inputs), repeats)
        _, t_bwd = time_call(lambda: fwd_bwd(inputs), repeats)
        temp = fwd_bwd.lower(inputs).compile().memory_analysis().temp_size_in_bytes
        rows[impl] = dict(fwd_s=t_fwd, fwd_bwd_s=t_bwd, fwd_bwd_temp_bytes=temp)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-jax bench scan", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d", type=int, default=256, help="channels (d_inner)")
    parser.add_argument("--n", type=int, default=16, help="state size")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = args.impls.split(",")
    if "reference" not in impls:
        impls = ["reference"] + impls

    print(f"selective scan benchmark: b={args.batch} d={args.d} n={args.n} chunk={args.chunk_size} float32")
    print(hardware_description())
    results = {}
    for l in tqdm(lengths, desc="lengths"):
        results[l] = bench_length(l, args, impls, args.chunk_size, args.repeats)

    header = ["l", "impl", "fwd ms", "fwd / ref", "fwd+bwd ms", "fwd+bwd / ref", "fwd+bwd temp MB", "auto picks"]
    rows = []
    for l, by_impl in results.items():
        ref = by_impl["reference"]
        auto = resolve_impl("auto", l)
        for impl, r in by_impl.items():
            rows.append([l, impl, r["fwd_s"] * 1e3, r["fwd_s"] / ref["fwd_s"], r["fwd_bwd_s"] * 1e3,
                         r["fwd_bwd_s"] / ref["fwd_bwd_s"], r["fwd_bwd_temp_bytes"] / 1e6,
                         "<-" if impl == auto else ""])
    print(markdown_table(header, rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(hardware=hardware_description(), config=vars(args), results=results), f, indent=1)
    return 0
