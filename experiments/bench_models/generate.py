"""`mamba-jax bench generate`: batched generation throughput of models of equal non-embedding parameters.

Serving-benchmark protocol: each model generates exactly `length` tokens per row (no EOS) after a random
prompt of `--prompt-len` tokens, through the same `generate` (one compiled prefill + decode loop, the same
sampler at temperature 1, float32) with caches sized exactly prompt + length. Compile time is excluded
(the compiled program is timed), the models are interleaved within each repeat (so drift on a shared
machine hits every model alike), and each figure is the median of `--repeats` runs.

Models (`build_models`): a Llama Transformer (grouped-query attention, SwiGLU MLP); the M1-layout hybrid
made from it (`attention_to_mamba1`: Mamba-1 in the MambaInLlama form at every layer but M1's attention
layers, `m1_attention_layers`); and Mamba and Mamba-2 language models whose depth is chosen so their
non-embedding parameters are closest to the Transformer's. Printed per model: non-embedding parameters,
MFLOP per generated token (2 · matmul parameters incl. the head, plus the attention products at the mean
context; element-wise scan work not counted), cache MB per sequence, and the compiled program's memory
(arguments + outputs + temporaries: XLA's estimate, on CPU there is no allocator peak to read).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from tqdm import tqdm

from experiments.bench_models.common import positive_ints, tree_bytes
from mamba_jax.bench_utils import hardware_description, markdown_table
from mamba_jax.models import (DecoderLM, HybridLM, Mamba2Config, Mamba2LM, MambaConfig, MambaLM, TransformerConfig,
                              TransformerLM, init_cache, init_params)

MODELS = ("transformer", "hybrid", "mamba", "mamba2")
EMBEDDING_PARAMS = ("embeddings", "position_embeddings", "lm_head")


def non_embedding_params(params) -> int:
    """Parameters outside the token / position embeddings and the output head."""
    return int(sum(np.size(x) for name, sub in params.items() if name not in EMBEDDING_PARAMS
                   for x in jax.tree_util.tree_leaves(sub)))


def _closest_depth(make, params_of, target: int, max_layers: int = 64) -> int:
    """The n_layer whose model has non-embedding parameters closest to `target` (parameters grow linearly
    with depth, so two shapes suffice)."""
    one, two = params_of(make(1)), params_of(make(2))
    per_layer, base = two - one, 2 * one - two
    return int(np.clip(round((target - base) / per_layer), 1, max_layers))


def build_models(args, rng) -> Dict[str, Tuple[DecoderLM, dict]]:
    """{name: (model, params)} for the names in args.models (see the module docstring)."""
    from experiments.m1.config import m1_attention_layers
    from mamba_jax.distill.attention_init import attention_to_mamba1

    common = dict(vocab_size=args.vocab_size, d_model=args.d_model)
    teacher = TransformerLM(TransformerConfig(**common, n_layer=args.n_layer, n_heads=args.n_heads,
                                              n_kv_heads=args.n_kv_heads))
    t_params = init_params(teacher, rng)
    target = non_embedding_params(t_params)
    shapes = lambda model: jax.eval_shape(lambda: init_params(model, rng))   # noqa: E731
    count = lambda model: non_embedding_params(shapes(model))               # noqa: E731
    out = {}
    for name in args.models:
        if name == "transformer":
            out[name] = (teacher, t_params)
        elif name == "hybrid":
            keep = set(m1_attention_layers(args.n_layer))
            config, params = attention_to_mamba1(teacher.config, t_params, rng, d_state=args.d_state,
                                                 layers=[i for i in range(args.n_layer) if i not in keep],
                                                 conv_init="fresh", ssm_init="fresh", gate_init="fresh")
            out[name] = (HybridLM(config), params)
        else:
            cls, cfg = ((MambaLM, lambda n: MambaConfig(**common, n_layer=n, d_state=args.d_state))
                        if name == "mamba" else
                        (Mamba2LM, lambda n: Mamba2Config(**common, n_layer=n, head_dim=args.head_dim,
                                                          d_state=args.mamba2_d_state)))
            depth = _closest_depth(lambda n: cls(cfg(n)), count, target)
            model = cls(cfg(depth))
            out[name] = (model, init_params(model, rng))
    return out


def mflop_per_token(model: DecoderLM, params, mean_context: float) -> float:
    """2 · (non-embedding + head) parameters, plus 4 · n_heads · head_dim · mean_context per attention layer."""
    cfg = model.config
    head = cfg.vocab_size * cfg.d_model
    flops = 2 * (non_embedding_params(params) + head)
    for kind in cfg.layer_kinds:
        if kind == "A":
            a = cfg.mixer_config("A")
            flops += 4 * a.n_heads * a.head_dim_value * mean_context
    return flops / 1e6


def _generate_fn(model, length: int):
    from mamba_jax.inference import generate

    return jax.jit(lambda params, prompt, key: generate(model, params, prompt, length, temperature=1.0, rng=key))


def bench(args, models):
    rng = jax.random.PRNGKey(args.seed)
    results = {name: dict(non_embedding_params=non_embedding_params(p), n_layer=m.config.n_layer,
                          layer_kinds="".join(k[0] for k in m.config.layer_kinds), cells={})
               for name, (m, p) in models.items()}
    cells = [(b, n) for b in args.batches for n in args.lengths]
    for batch, length in tqdm(cells, desc="batch x length"):
        key = (f"{batch}x{length}")
        if batch * length > args.max_tokens:
            for r in results.values():
                r["cells"][key] = dict(skipped=f"batch · length > --max-tokens {args.max_tokens}")
            continue
        prompt = jax.random.randint(jax.random.fold_in(rng, batch * 100003 + length), (batch, args.prompt_len), 0,
                                    args.vocab_size)
        compiled = {}
        for name, (model, params) in models.items():
            lowered = _generate_fn(model, length).lower(params, prompt, rng)
            compiled[name] = exe = lowered.compile()
            mem = exe.memory_analysis()
            program_bytes = (None if mem is None else
                             mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
            jax.block_until_ready(exe(params, prompt, rng))    # warm-up: first-run allocations
            results[name]["cells"][key] = dict(
                times=[], cache_bytes_per_seq=tree_bytes(init_cache(model.config, 1, args.prompt_len + length)),
                program_bytes=program_bytes,
                mflop_per_token=mflop_per_token(model, params, args.prompt_len + length / 2))
        for _ in range(args.repeats):
            for name, (model, params) in models.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled[name](params, prompt, rng))
                results[name]["cells"][key]["times"].append(time.perf_counter() - start)
        for name in models:
            cell = results[name]["cells"][key]
            cell["seconds"] = statistics.median(cell["times"])
            cell["tokens_per_s"] = batch * length / cell["seconds"]
    return results


def rows_and_ratios(results, batches, lengths):
    rows = []
    base = results.get("transformer")
    for batch in batches:
        for length in lengths:
            key = f"{batch}x{length}"
            for name, r in results.items():
                cell = r["cells"][key]
                if "skipped" in cell:
                    continue
                ratio = cell["tokens_per_s"] / base["cells"][key]["tokens_per_s"] if base else float("nan")
                cell["ratio_vs_transformer"] = ratio
                program = "n/a" if cell["program_bytes"] is None else cell["program_bytes"] / 1e6
                rows.append([batch, length, name, cell["tokens_per_s"], ratio, cell["cache_bytes_per_seq"] / 1e6,
                             program, cell["mflop_per_token"]])
    return rows


def plot(results, batches, lengths, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in results.items():
        if name == "transformer":
            continue
        for batch in batches:
            pts = [(n, r["cells"][f"{batch}x{n}"].get("ratio_vs_transformer")) for n in lengths]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{name}, batch {batch}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per row")
    ax.set_ylabel("tokens/s ÷ Transformer's")
    ax.set_title("generation throughput at equal non-embedding parameters")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-jax bench generate", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive_ints, default=[1, 8, 32], help="batch sizes (the issue's "
                        "sweep is 1,8,32,128)")
    parser.add_argument("--lengths", type=positive_ints, default=[128, 512, 2048],
                        help="generated tokens per row (the issue's sweep is 128,512,2048,8192)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="skip cells with batch · length above this (CPU time); say so in the table")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--models", type=lambda t: _models(parser, t), default=list(MODELS),
                        help=f"subset of {MODELS}")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=8, help="Transformer (and hybrid) depth")
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=2, help="grouped-query attention (Llama 3: 8 of 24)")
    parser.add_argument("--d-state", type=int, default=16, help="Mamba-1 and hybrid d_state")
    parser.add_argument("--head-dim", type=int, default=64, help="Mamba-2 head dim")
    parser.add_argument("--mamba2-d-state", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="results/bench_generate", help="JSON and plot go here")
    args = parser.parse_args(argv)
    for name in ("max_tokens", "prompt_len", "d_model", "n_layer", "n_heads", "n_kv_heads", "d_state", "head_dim",
                 "mamba2_d_state", "vocab_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    try:
        models = build_models(args, jax.random.PRNGKey(args.seed))
    except ValueError as err:
        parser.error(str(err))
    results = bench(args, models)
    rows = rows_and_ratios(results, args.batches, args.lengths)
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"generation benchmark: prompt {args.prompt_len} tokens, temperature 1, float32, median of "
          f"{args.repeats} interleaved runs, compile excluded")
    print(hardware_description())
    print(markdown_table(["model", "non-embedding params", "layers", "kinds"],
                         [[n, r["non_embedding_params"], r["n_layer"], r["layer_kinds"]] for n, r in results.items()]))
    print(markdown_table(["batch", "generated", "model", "tokens / s", "ratio vs transformer", "cache MB / seq",
                          "program MB", "MFLOP / token"], rows))
    skipped = sorted({k for r in results.values() for k, c in r["cells"].items() if "skipped" in c})
    if skipped:
        print(f"skipped (batch x length > --max-tokens {args.max_tokens}): {', '.join(skipped)}")
    plot(results, args.batches, args.lengths, os.path.join(args.out_dir, "ratio_vs_transformer.png"))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(dict(hardware=hardware_description(), config=vars(args), results=results), f, indent=1)
    print(f"wrote {args.out_dir}/results.json and ratio_vs_transformer.png")
    return 0


def _models(parser, text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = sorted(set(names) - set(MODELS))
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad}; choose from {MODELS}")
    return names
