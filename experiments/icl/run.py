"""`mamba-jax run icl`: in-context regression, Mamba vs Transformer vs exact baselines.

Trains each model of the config (curriculum of Garg et al.) on prompts drawn fresh every step, then
scores models and baselines on the same held-out prompts at full dimension, `eval_points` examples long
(past the trained length: out of distribution). Writes `results/icl/<timestamp>/`: config.json,
metrics.jsonl (training loss), results.json, results.md (the table, printed at the end) and
errors.png (normalised squared error against the number of in-context examples).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

from experiments.icl.baselines import BASELINES_FOR_TASK, squared_error
from experiments.icl.config import PRESETS, ICLConfig, preset_config
from experiments.icl.train import model_errors, train
from experiments.lm.config import apply_overrides, parse_overrides
from mamba_jax.bench_utils import hardware_description, markdown_table
from mamba_jax.data.function_classes import TASKS, sample_prompts

RESULTS_ROOT = os.path.join("results", "icl")
EVAL_SEED_OFFSET = 10_000  # evaluation prompts come from a key no training step uses


def parse_command_line(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="mamba-jax run icl", description=__doc__.splitlines()[0],
                                     epilog="key=value overrides any ICLConfig field, e.g. num_steps=200 d=5")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--task", choices=TASKS, default="linear_regression")
    parser.add_argument("--out", default=None, help="run directory (default: results/icl/<timestamp>)")
    args, rest = parser.parse_known_args(list(argv))
    flags = [item for item in rest if item.startswith("-") and not item.startswith("--config.")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    try:
        config = apply_overrides(preset_config(args.preset, args.task), parse_overrides(rest))
    except ValueError as error:
        parser.error(str(error))
    out = args.out or os.path.join(RESULTS_ROOT, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return config, out


def report_positions(n: int, trained: int):
    """The in-context example counts the table shows: a few early, the trained length, the longest."""
    return sorted({1, 2, 4, max(1, trained // 2), trained - 1, n - 1} & set(range(n)))


def evaluate_all(config: ICLConfig, trained: Dict[str, Any]) -> Dict[str, list]:
    """{name: per-position normalised error} for every model and baseline, on the same prompts."""
    xs, ys = sample_prompts(jax.random.PRNGKey(config.seed + EVAL_SEED_OFFSET), config.task, config.eval_prompts,
                            config.eval_points, config.d)
    errors = {}
    for name, (model, params) in trained.items():
        errors[name] = model_errors(model, params, xs, ys, config.task, config.d).tolist()
    for name, baseline in BASELINES_FOR_TASK[config.task]:
        errors[name] = squared_error(baseline(xs, ys), ys, config.task, config.d).tolist()
    return errors


def plot_errors(errors: Dict[str, list], path: str, *, title: str, trained_points: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in errors.items():
        ax.plot(range(len(curve)), curve, label=name, lw=2.2 if name in ("mamba", "mamba2", "transformer", "hybrid")
                else 1.2, ls="-" if name in ("mamba", "mamba2", "transformer", "hybrid") else "--")
    ax.axvline(trained_points - 1, color="grey", lw=0.8, ls=":", label="trained length")
    ax.set_xlabel("in-context examples")
    ax.set_ylabel("squared error / d")
    ax.set_ylim(0, 1.25)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(config: ICLConfig, errors: Dict[str, list]) -> str:
    positions = report_positions(config.eval_points, config.points_end)
    rows = [[name] + [errors[name][i] for i in positions] for name in errors]
    header = ["model / baseline"] + [f"{i} examples" for i in positions]
    return (f"### ICL `{config.task}`, d = {config.d}, preset `{config.preset}`\n\n"
            f"Normalised squared error (1 = predicting 0), {config.eval_prompts} held-out prompts; trained on "
            f"up to {config.points_end} examples (later columns are out of distribution).\n\n"
            + markdown_table(header, rows) + f"\n\n{hardware_description()}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, out = parse_command_line([] if argv is None else argv)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    dims, points = config.curricula()
    trained, histories = {}, {}
    for i, (name, model) in enumerate(config.build_models().items()):
        state, history = train(model, task=config.task, d=config.d, num_steps=config.num_steps,
                               batch_size=config.batch_size, dims=dims, points=points,
                               learning_rate=config.learning_rate, seed=config.seed + i,
                               log_every=config.log_every, progress=config.progress)
        trained[name], histories[name] = (model, state.params), history
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for name, history in histories.items():
            for record in history:
                f.write(json.dumps(dict(model=name, **record)) + "\n")
    errors = evaluate_all(config, trained)
    table = results_markdown(config, errors)
    results = dict(config=dataclasses.asdict(config), errors=errors,
                   final_train_loss={name: h[-1]["loss"] for name, h in histories.items()},
                   hardware=hardware_description())
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_errors(errors, os.path.join(out, "errors.png"), title=f"{config.task}, d = {config.d}",
                trained_points=config.points_end)
    print(table)
    print(f"wrote {out}/results.md, results.json, errors.png")
    return 0
