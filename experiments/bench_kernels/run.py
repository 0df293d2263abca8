"""`mamba-jax bench kernels`: the Pallas kernels against the HBM roofline and the other impls.

`--op selective_scan` (default) times the Mamba-1 selective scan; `--op ssd` the Mamba-2 SSD (see
`ssd.py`), where the baseline `mamba_ssm` is the official Triton kernel `mamba_chunk_scan_combined`
run through torch on the same values in the same run.

For every length: forward and forward+backward time of `impl="pallas"` (median of repeats, compilation
excluded), the bytes those passes must move at the least (every input read once, every output written
once), the achieved bytes/s and its share of the device's peak HBM bandwidth (the roofline), and the
ratio of each baseline impl's time to the kernel's in the same run (> 1: the kernel is faster).

Bytes that must move (element size s of the inputs; A is float32):
  forward   u, Δ, z (b·l·d each) + B, C (b·l·n each) in, y (b·l·d) out, A (d·n) in
  fwd+bwd   the forward's bytes, then the backward's: the forward's inputs again and dy in, du, dΔ, dz,
            dB, dC (same shapes) and dA out (the backward recomputes the states; y is not re-read)
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.bench_kernels import ssd as ssd_bench
from mamba_jax.bench_utils import hardware_description, markdown_table, time_call
from mamba_jax.ops import selective_scan

# Peak HBM bandwidth in bytes/s by `device_kind` prefix (vendor data sheets).
PEAK_HBM_BYTES_PER_S = {
    "NVIDIA H100 80GB HBM3": 3.35e12,   # SXM
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "TPU v5 lite": 8.19e11,             # v5e
    "TPU v5p": 2.765e12,
    "TPU v4": 1.2e12,
}


def peak_bandwidth(device_kind: str) -> Optional[float]:
    """Peak HBM bytes/s of a `jax.Device.device_kind` (None when unknown, e.g. a CPU)."""
    for prefix, value in PEAK_HBM_BYTES_PER_S.items():
        if device_kind.startswith(prefix):
            return value
    return None


def min_bytes(b: int, l: int, d: int, n: int, itemsize: int) -> Dict[str, int]:
    """The bytes the forward and the forward+backward must move at the least (see the module docstring)."""
    big, small, a = b * l * d * itemsize, b * l * n * itemsize, d * n * 4
    inputs = 3 * big + 2 * small + a
    fwd = inputs + big
    bwd = inputs + big + (3 * big + 2 * small + a)
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}


def make_inputs(b: int, l: int, d: int, n: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    return dict(
        u=jax.random.normal(keys[0], (b, l, d), dtype),
        dt=(jax.random.normal(keys[1], (b, l, d)) * 0.5).astype(dtype),
        A=-jnp.exp(jax.random.normal(keys[2], (d, n)) * 0.5),
        B=jax.random.normal(keys[3], (b, l, n), dtype),
        C=jax.random.normal(keys[4], (b, l, n), dtype),
        z=jax.random.normal(keys[5], (b, l, d), dtype),
    )


def build(impl: str, chunk_size: int):
    scan = lambda a: selective_scan(**a, dt_softplus=True, impl=impl, chunk_size=chunk_size)  # noqa: E731
    fwd = jax.jit(scan)
    # the cotangent dy = y (grad of ½‖y‖²): one (b, l, d) read, as in a training step
    fwd_bwd = jax.jit(jax.grad(lambda a: 0.5 * jnp.sum(jnp.square(scan(a).astype(jnp.float32)))))
    return fwd, fwd_bwd


def _problem(args, l: int, itemsize: int):
    """(inputs builder, jitted-passes builder, bytes that must move) of --op at length l."""
    if args.op == "ssd":
        h, p, g, n = ssd_bench.shapes(args.batch, args.d, args.head_dim, args.groups, args.n)
        return (lambda dtype: ssd_bench.make_inputs(args.batch, l, h, p, g, n, dtype), ssd_bench.build,
                ssd_bench.min_bytes(args.batch, l, h, p, g, n, itemsize))
    return (lambda dtype: make_inputs(args.batch, l, args.d, args.n, dtype), build,
            min_bytes(args.batch, l, args.d, args.n, itemsize))


def bench(lengths: Sequence[int], args, impls: Sequence[str], dtype) -> Dict[int, Dict[str, Dict[str, float]]]:
    results = {}
    for l in tqdm(lengths, desc="lengths"):
        make, build_passes, _ = _problem(args, l, dtype.itemsize)
        inputs = make(dtype)
        results[l] = {}
        for impl in impls:
            if impl == ssd_bench.MAMBA_SSM:
                results[l][impl] = ssd_bench.mamba_ssm_times(inputs, args.chunk_size, args.repeats, args.forward_only)
                continue
            fwd, fwd_bwd = build_passes(impl, args.chunk_size)
            _, t_fwd = time_call(lambda: fwd(inputs), args.repeats)
            t_bwd = None
            if not args.forward_only:
                _, t_bwd = time_call(lambda: fwd_bwd(inputs), args.repeats)
            results[l][impl] = {"fwd_s": t_fwd, "fwd_bwd_s": t_bwd}
    return results


def table_rows(results, args, itemsize: int, peak: Optional[float], kernel: str, baselines: Sequence[str]):
    rows = []
    for l, by_impl in results.items():
        need = _problem(args, l, itemsize)[2]
        for phase in ("fwd", "fwd_bwd"):
            t = by_impl[kernel][f"{phase}_s"]
            if t is None:
                continue
            rate = need[phase] / t
            row = [l, phase.replace("_", "+"), t * 1e3, need[phase] / 1e6, rate / 1e9,
                   "n/a" if peak is None else 100.0 * rate / peak]
            row += [by_impl[base][f"{phase}_s"] / t for base in baselines]
            rows.append(row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-jax bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("selective_scan", "ssd"), default="selective_scan")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d", type=int, default=2048, help="channels (d_inner; heads × head_dim for ssd)")
    parser.add_argument("--n", type=int, default=None, help="state size (default 16; 128 for ssd)")
    parser.add_argument("--head-dim", type=int, default=64, help="ssd: channels per head")
    parser.add_argument("--groups", type=int, default=1, help="ssd: B/C groups")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--chunk-size", type=int, default=256, help="for the chunked baselines")
    parser.add_argument("--kernel", default="pallas", help="the impl measured against the roofline")
    parser.add_argument("--baselines", default=None,
                        help="default associative,chunked (selective_scan); chunked,mamba_ssm (ssd)")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.n is None:
        args.n = 128 if args.op == "ssd" else 16
    if args.baselines is None:
        args.baselines = f"chunked,{ssd_bench.MAMBA_SSM}" if args.op == "ssd" else "associative,chunked"
    baselines = [b for b in args.baselines.split(",") if b and b != args.kernel]
    if ssd_bench.MAMBA_SSM in baselines:
        if args.op != "ssd":
            parser.error(f"--baselines {ssd_bench.MAMBA_SSM} needs --op ssd")
        why_not = ssd_bench.mamba_ssm_available()
        if why_not:
            print(f"skipping the {ssd_bench.MAMBA_SSM} baseline: {why_not}")
            baselines.remove(ssd_bench.MAMBA_SSM)
    dtype = jnp.dtype(args.dtype)
    device_kind = jax.devices()[0].device_kind
    peak = peak_bandwidth(device_kind)

    shape = (f"b={args.batch} d={args.d} n={args.n}" if args.op == "selective_scan" else
             f"b={args.batch} heads={args.d // args.head_dim} head_dim={args.head_dim} groups={args.groups} n={args.n}")
    print(f"kernel benchmark ({args.op}): {args.kernel} vs {', '.join(baselines) or 'nothing'}; {shape} "
          f"{args.dtype} inputs, Δ with softplus, z gating")
    print(hardware_description())
    print(f"peak HBM bandwidth of {device_kind!r}: " + ("unknown (no roofline)" if peak is None
                                                        else f"{peak / 1e12:.2f} TB/s"))
    results = bench(lengths, args, [args.kernel] + baselines, dtype)
    header = ["l", "pass", "ms", "min MB moved", "GB/s", "% of HBM roofline"] + [f"x vs {b}" for b in baselines]
    print(markdown_table(header, table_rows(results, args, dtype.itemsize, peak, args.kernel, baselines)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(hardware=hardware_description(), device_kind=device_kind, peak_bytes_per_s=peak,
                           config=vars(args), results=results), f, indent=1)
    return 0
