"""`mamba-jax bench moe`: train-step tokens/s of MoE-Mamba against the dense Mamba baseline, both dispatch paths.

The models are the `moe_mamba` experiment's arms (`experiments/moe_mamba/config.py`): ``mamba`` is the paper's
dense baseline (2·n_blocks Mamba layers, `mamba_baseline_config`) and ``moe`` MoE-Mamba (n_blocks × (Mamba,
Switch MoE)) with about the same active parameters per token (printed in the table); other MoE arms
(``moe_top2``, ``moe_e16``, ...) can be added with ``--arms``. Every MoE arm runs once per dispatch path
(``dense``: one-hot einsums; ``sorted``: sort-based gather/scatter, see `mamba_jax.ops.moe`).

For each row: one full optimizer step (`make_train_step`: forward, backward, AdamW update of the
experiment's optimizer) on a fixed batch of random byte tokens (b, l); the first `--warmup` steps (the
first one compiles) are not timed, then `--steps` steps are each timed to `jax.block_until_ready`;
``step ms`` is their median and ``tokens/s`` = b·l / median. ``x vs mamba`` = the row's tokens/s / the
``mamba`` row's tokens/s measured in the same run (> 1: faster than dense Mamba).

    mamba-jax bench moe [--arms mamba,moe] [--dispatches dense,sorted] [--d-model 64] [--n-blocks 2]
                        [--n-experts 8] [--d-expert 0] [--seq-len 128] [--batch 16] [--steps 5] [--out f.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from experiments.moe_mamba.config import ARM_FORMS, BASELINE, MoEMambaConfig, arm_settings, preset_config
from mamba_jax.bench_utils import hardware_description, markdown_table
from mamba_jax.ops.moe import DISPATCHES

HEADER = ["arm", "dispatch", "params", "active params/token", "step ms", "tokens/s", "x vs mamba"]


def experiment_config(*, d_model: int, n_blocks: int, n_experts: int, seq_len: int, batch: int,
                      router: str = "switch", capacity_factor: float = 1.0, d_state: int = 16, d_expert: int = 0,
                      arms: Sequence[str] = (BASELINE, "moe"), scan_impl: str = "auto") -> MoEMambaConfig:
    """The `moe_mamba` experiment's config (the `cpu` preset's optimizer) at these sizes, for `arms`
    (d_expert 0: 3·d_model, the paper's expert width)."""
    return dataclasses.replace(preset_config("cpu"), arms=",".join(arms), d_model=d_model, n_blocks=n_blocks,
                               n_experts=n_experts, seq_len=seq_len, batch_size=batch, router=router,
                               capacity_factor=capacity_factor, d_state=d_state, d_expert=d_expert,
                               scan_impl=scan_impl, tensorboard=False, progress=False)


def random_batch(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """inputs/targets (b, l) int32 random tokens, loss_mask (b, l) all True."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq_len), bool)}


def time_train_steps(config: MoEMambaConfig, arm: str, batch: Dict[str, np.ndarray], *, steps: int,
                     warmup: int = 1) -> Dict[str, Any]:
    """Build `arm`'s model from `config`, run `warmup` untimed and `steps` timed optimizer steps on `batch`.

    Returns params (total), active (per token), compile_s (the first step, compilation included),
    step_times_s (each timed step), step_s (their median) and tokens_per_s (b·l / step_s).
    """
    from mamba_jax.models import HybridLM, MambaLM, init_params
    from mamba_jax.models.moe_mamba import parameter_counts
    from mamba_jax.train import create_train_state, make_optimizer, make_train_step

    model_config = config.model_config(arm)
    model = (MambaLM if arm == BASELINE else HybridLM)(model_config)
    params = init_params(model, jax.random.PRNGKey(config.seed), seq_len=config.seq_len)
    counts = parameter_counts(model_config, params)
    state = create_train_state(model.apply, params, make_optimizer(config.lm_config().optimizer_config()))
    step = make_train_step()
    batch = jax.device_put(batch)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = int(np.prod(batch["inputs"].shape))
    return {"params": counts["total"], "active": counts["active"], "compile_s": compile_s, "step_times_s": times,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "loss": float(metrics["loss"])}


def bench(config: MoEMambaConfig, dispatches: Sequence[str] = DISPATCHES, *, steps: int = 5,
          warmup: int = 1) -> List[Dict[str, Any]]:
    """One row per (arm, dispatch) — the baseline once, with dispatch None — in `config.arm_names()` order;
    each row is `time_train_steps`'s dict plus arm, dispatch and ratio_vs_mamba (tokens/s over the ``mamba``
    row's, None without a ``mamba`` arm). Every row trains on the same random batch."""
    batch = random_batch(config.batch_size, config.seq_len, config.model_config(config.arm_names()[0]).vocab_size,
                         config.seed)
    rows = []
    for arm in config.arm_names():
        for dispatch in ([None] if arm == BASELINE else dispatches):
            arm_config = config if dispatch is None else dataclasses.replace(config, dispatch=dispatch)
            rows.append(dict(arm=arm, dispatch=dispatch,
                             **time_train_steps(arm_config, arm, batch, steps=steps, warmup=warmup)))
    base = next((r for r in rows if r["arm"] == BASELINE), None)
    for r in rows:
        r["ratio_vs_mamba"] = None if base is None else r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def table_rows(rows: Sequence[Dict[str, Any]]) -> List[List[Any]]:
    """The printed table's rows (columns `HEADER`)."""
    return [[r["arm"], r["dispatch"] or "—", f"{r['params']:,}", f"{r['active']:,}", r["step_s"] * 1e3,
             round(r["tokens_per_s"]), "—" if r["ratio_vs_mamba"] is None else r["ratio_vs_mamba"]] for r in rows]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int; got {text}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-jax bench moe", description=__doc__.splitlines()[0],
                                     epilog="Defaults are the moe_mamba experiment's `cpu` preset sizes (about a "
                                            "minute on a 2-core CPU).")
    parser.add_argument("--arms", default=f"{BASELINE},moe",
                        help=f"comma-separated moe_mamba arms ({', '.join(ARM_FORMS)}); 'mamba' is the dense "
                             f"baseline the ratios refer to")
    parser.add_argument("--dispatches", default=",".join(DISPATCHES), help="MoE dispatch paths: dense,sorted")
    parser.add_argument("--d-model", type=_positive_int, default=64)
    parser.add_argument("--n-blocks", type=_positive_int, default=2,
                        help="MoE-Mamba blocks (Mamba + MoE); the baseline has twice as many Mamba layers")
    parser.add_argument("--n-experts", type=_positive_int, default=8)
    parser.add_argument("--router", choices=("switch", "topk"), default="switch")   # expert choice: not causal
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--d-expert", type=int, default=0,
                        help="expert FFN width; 0 = 3·d_model (the paper's; at d_model 64, 251 equalises the "
                             "active parameters per token exactly)")
    parser.add_argument("--d-state", type=_positive_int, default=16)
    parser.add_argument("--scan-impl", default="auto", help="the Mamba layers' selective-scan impl")
    parser.add_argument("--seq-len", type=_positive_int, default=128)
    parser.add_argument("--batch", type=_positive_int, default=16)
    parser.add_argument("--steps", type=_positive_int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=_positive_int, default=1, help="untimed steps first (the first compiles)")
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    dispatches = [d.strip() for d in args.dispatches.split(",") if d.strip()]
    for d in dispatches:
        if d not in DISPATCHES:
            parser.error(f"--dispatches: each must be one of {', '.join(DISPATCHES)}; got {d!r}")
    try:
        for arm in arms:
            arm_settings(arm)
        config = experiment_config(d_model=args.d_model, n_blocks=args.n_blocks, n_experts=args.n_experts,
                                   seq_len=args.seq_len, batch=args.batch, router=args.router,
                                   capacity_factor=args.capacity_factor, d_state=args.d_state,
                                   d_expert=args.d_expert, arms=arms,
                                   scan_impl=args.scan_impl)
    except ValueError as error:
        parser.error(str(error))
    if not dispatches and any(a != BASELINE for a in arms):
        parser.error("--dispatches: name at least one of dense,sorted")

    print(f"MoE-Mamba train-step benchmark: d_model={args.d_model} n_blocks={args.n_blocks} "
          f"n_experts={args.n_experts} d_expert={args.d_expert or 3 * args.d_model} router={args.router} "
          f"capacity_factor={args.capacity_factor} "
          f"d_state={args.d_state}; batch {args.batch} × {args.seq_len} tokens, float32, AdamW; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(hardware_description())
    rows = bench(config, dispatches, steps=args.steps, warmup=args.warmup)
    print(markdown_table(HEADER, table_rows(rows)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(hardware=hardware_description(), config=vars(args), rows=rows), f, indent=1)
    return 0
