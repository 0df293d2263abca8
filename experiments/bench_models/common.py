"""Shared set-up of `mamba-jax bench decode` and `mamba-jax bench prefill`: the four model families at
equal width and depth, option parsing, and the result table."""
from __future__ import annotations

import argparse
import json
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from mamba_jax.bench_utils import hardware_description, markdown_table
from mamba_jax.models import (DecoderLM, HybridConfig, HybridLM, Mamba2Config, Mamba2LM, MambaConfig, MambaLM,
                              TransformerConfig, TransformerLM)

FAMILIES = ("mamba", "mamba2", "transformer", "hybrid")


def build_models(args) -> Dict[str, DecoderLM]:
    """The four models at d_model = args.d_model, n_layer = args.n_layer (the hybrid: `args.pattern`,
    which must have n_layer layers). Mamba families have no MLP; the Transformer has a 4·d_model SwiGLU MLP."""
    common = dict(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer)
    mamba = MambaConfig(**common, scan_impl=args.scan_impl)
    mamba2 = Mamba2Config(**common, head_dim=args.head_dim, d_state=args.mamba2_d_state)
    transformer = TransformerConfig(**common, n_heads=args.n_heads, d_intermediate=4 * args.d_model)
    models = {
        "mamba": MambaLM(mamba),
        "mamba2": Mamba2LM(mamba2),
        "transformer": TransformerLM(transformer),
        "hybrid": HybridLM(HybridConfig(pattern=args.pattern, **{**common, "n_layer": None},
                                        mamba=mamba, mamba2=mamba2, attention=transformer)),
    }
    return {name: models[name] for name in args.models}


def positive_ints(text: str):
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints; got {text!r}")
    return values


def model_names(text: str):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = sorted(set(names) - set(FAMILIES))
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad}; choose from {FAMILIES}")
    return names


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--lengths", type=positive_ints, default=[1024, 2048, 4096, 8192, 16384],
                        help="context lengths (comma-separated)")
    parser.add_argument("--models", type=model_names, default=list(FAMILIES), help=f"subset of {FAMILIES}")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--pattern", default="M2 M2 A M2", help="hybrid layer pattern (n_layer layers)")
    parser.add_argument("--n-heads", type=int, default=4, help="attention heads")
    parser.add_argument("--head-dim", type=int, default=64, help="Mamba-2 head dim")
    parser.add_argument("--mamba2-d-state", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scan-impl", default="auto", help="Mamba-1 scan implementation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    for name in ("d_model", "n_layer", "n_heads", "head_dim", "vocab_size", "batch", "repeats", "mamba2_d_state"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    from mamba_jax.models import parse_pattern
    try:
        if "hybrid" in args.models and len(parse_pattern(args.pattern)) != args.n_layer:
            parser.error(f"--pattern {args.pattern!r} must have --n-layer={args.n_layer} layers (equal depth)")
        build_models(args)
    except ValueError as err:
        parser.error(str(err))


def report(title: str, args, header: Sequence[str], rows, results, out: Optional[str]) -> None:
    print(title)
    print(hardware_description())
    print(markdown_table(header, rows))
    if out:
        with open(out, "w") as f:
            json.dump(dict(hardware=hardware_description(), config={k: v for k, v in vars(args).items()},
                           results=results), f, indent=1)


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
