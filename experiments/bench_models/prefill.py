"""`mamba-jax bench prefill`: prefill throughput (tokens/s) against prompt length.

Each model (Mamba, Mamba-2, Transformer, a hybrid — equal width and depth) prefills a random prompt of
length L into a fresh cache, in chunks of `--chunk` tokens (one compiled chunk step, as a server would
run it; the Transformer's attention then needs chunk × L scores at a time rather than L × L).
Ratios are against the Transformer at the same length, measured in the same run.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
from tqdm import tqdm

from experiments.bench_models.common import base_parser, build_models, check_args, report
from mamba_jax.bench_utils import time_call
from mamba_jax.models import init_cache, init_params


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)   # donated: no copy of the cache per chunk
def prefill_chunk(model, params, ids, cache):
    out = model.apply({"params": params}, ids, cache=cache, method="forward")
    return out.logits[:, -1], out.cache


def prefill_all(model, params, ids, chunk: int):
    """Prefill `ids` (b, L) chunk by chunk; returns the last logits (b, vocab)."""
    b, length = ids.shape
    cache = init_cache(model.config, b, max_len=length)
    logits = None
    for start in range(0, length, chunk):
        logits, cache = prefill_chunk(model, params, ids[:, start:start + chunk], cache)
    return logits


def bench(args):
    models = build_models(args)
    key = jax.random.PRNGKey(args.seed)
    results = {}
    for name, model in tqdm(models.items(), desc="models"):
        params = init_params(model, key)
        results[name] = {}
        for length in tqdm(args.lengths, desc=name, leave=False):
            ids = jax.random.randint(key, (args.batch, length), 0, args.vocab_size)
            chunk = min(args.chunk, length)
            _, t = time_call(lambda: prefill_all(model, params, ids, chunk), args.repeats)
            results[name][length] = dict(seconds=t, tokens_per_s=args.batch * length / t)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = base_parser("mamba-jax bench prefill", __doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.chunk < 1:
        parser.error(f"--chunk must be a positive int; got {args.chunk}")
    results = bench(args)
    base = results.get("transformer")
    rows = [[name, length, r["tokens_per_s"], r["tokens_per_s"] / base[length]["tokens_per_s"] if base else float("nan")]
            for name, by_len in results.items() for length, r in by_len.items()]
    report(f"prefill benchmark: batch {args.batch}, d_model {args.d_model}, n_layer {args.n_layer}, hybrid "
           f"'{args.pattern}', chunk {args.chunk}, float32", args,
           ["model", "length", "tokens / s", "ratio vs transformer"], rows, results, args.out)
    return 0
