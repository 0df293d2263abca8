"""`mamba-jax bench decode`: per-token decode latency and cache memory against context length.

For each model (Mamba, Mamba-2, Transformer, a hybrid — equal width and depth) and each context length
L, the cache is put in the state it has after L tokens and `--steps` greedy tokens are decoded in one
compiled loop (as `generate` does); the latency is the loop's median time / steps. Recurrent states have
a fixed size; a KV cache holds L + steps slots (or `--max-len` slots: one allocation for every L, to show
that a step costs the filled length, not the allocated one), filled with random keys/values (the values do
not change the work: every step attends to all L valid slots and reads only the filled cache blocks).
Prefill time is measured by `bench prefill`.
Ratios are against the Transformer at the same length, measured in the same run.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.bench_models.common import base_parser, build_models, check_args, report, tree_bytes
from mamba_jax.models import ModelCache, init_cache, init_params


def cache_after(model, batch: int, context: int, steps: int, key, max_len: Optional[int] = None) -> ModelCache:
    """A ModelCache as after `context` real tokens: random recurrent states; KV caches of `max_len` slots
    (default context + steps) with `context` valid random slots (room for `steps` more)."""
    max_len = context + steps if max_len is None else max_len
    cache = init_cache(model.config, batch, max_len=max_len)
    layers = []
    for i, layer in enumerate(cache.layers):
        keys = jax.random.split(jax.random.fold_in(key, i), len(layer))
        filled = [jax.random.normal(k, x.shape, x.dtype) * 0.1 if jnp.issubdtype(x.dtype, jnp.floating) else x
                  for k, x in zip(keys, layer)]
        layer = type(layer)(*filled)
        if hasattr(layer, "valid"):
            layer = layer._replace(valid=jnp.broadcast_to(jnp.arange(max_len) < context, layer.valid.shape),
                                   index=jnp.asarray(context, layer.index.dtype))
        layers.append(layer)
    return ModelCache(tuple(layers), jnp.full((batch,), context, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def decode_loop(model, params, cache, token, steps: int):
    """`steps` greedy decode steps; returns the tokens (steps, b) and the final cache. The cache is donated:
    without that, XLA copies the whole input cache once per call so the loop can update it in place (8
    copies of 16.8 MB for a 16k-slot cache, measured as ~1.8 ms per token at 32 steps per call); inside
    `generate` the cache is born in the program and never copied."""
    def body(carry, _):
        cache, token = carry
        out = model.apply({"params": params}, token[:, None], cache=cache, method="forward")
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(token.dtype)
        return (out.cache, nxt), nxt
    (cache, _), tokens = jax.lax.scan(body, (cache, token), None, length=steps)
    return tokens, cache


def bench(args):
    models = build_models(args)
    key = jax.random.PRNGKey(args.seed)
    results = {}
    for name, model in tqdm(models.items(), desc="models"):
        params = init_params(model, key)
        results[name] = {}
        for context in tqdm(args.lengths, desc=name, leave=False):
            token = jnp.zeros((args.batch,), jnp.int32)
            fresh = lambda: jax.block_until_ready(   # noqa: E731  (a new cache per call: the loop donates it)
                cache_after(model, args.batch, context, args.steps, key, args.max_len))
            cache_bytes = tree_bytes(fresh())
            times = []
            for _ in range(args.repeats + 1):       # the first call compiles
                cache = fresh()
                start = time.perf_counter()
                jax.block_until_ready(decode_loop(model, params, cache, token, args.steps))
                times.append(time.perf_counter() - start)
            t = statistics.median(times[1:])
            results[name][context] = dict(ms_per_token=t / args.steps * 1e3, cache_bytes=cache_bytes)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = base_parser("mamba-jax bench decode", __doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement")
    parser.add_argument("--max-len", type=int, default=None,
                        help="KV cache slots for every context length (default: context + steps)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.steps < 1:
        parser.error(f"--steps must be a positive int; got {args.steps}")
    if args.max_len is not None and args.max_len < max(args.lengths) + args.steps:
        parser.error(f"--max-len ({args.max_len}) must hold the longest context plus --steps "
                     f"({max(args.lengths)} + {args.steps})")
    results = bench(args)
    base = results.get("transformer")
    rows = []
    for name, by_len in results.items():
        for context, r in by_len.items():
            speedup = base[context]["ms_per_token"] / r["ms_per_token"] if base else float("nan")
            rows.append([name, context, r["ms_per_token"], speedup, r["cache_bytes"] / 1e6])
    slots = "context + steps" if args.max_len is None else str(args.max_len)
    report(f"decode benchmark: batch {args.batch}, d_model {args.d_model}, n_layer {args.n_layer}, hybrid "
           f"'{args.pattern}', {args.steps} steps per measurement, KV cache slots {slots}, float32", args,
           ["model", "context", "ms / token", "speed-up vs transformer", "cache MB"], rows, results, args.out)
    return 0
