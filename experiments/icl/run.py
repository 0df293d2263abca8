"""`mamba-jax run icl`: in-context regression, Mamba vs Transformer vs exact baselines.

Trains each model of the config (curriculum of Garg et al.) on prompts drawn fresh every step, then
scores models and baselines on the same held-out prompts at full dimension, `eval_points` examples long
(past the trained length: out of distribution) and with scaled inputs, and probes every layer (affine
probe of the logit lens, beside gradient-descent iterations). Writes `results/icl/<timestamp>/`:
config.json, metrics.jsonl (training loss), models/<name>/ (`save_pretrained`; `load_pretrained` reads
it back), results.json, results.md (the tables, printed at the end), errors.png (normalised squared
error against the number of in-context examples) and probes.png (error against layer depth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from experiments.icl.baselines import BASELINES_FOR_TASK, squared_error
from experiments.icl.config import MODEL_NAMES, MODEL_SIZES, PRESETS, ICLConfig, preset_config
from experiments.icl import probe
from experiments.icl.train import LINEAR_TASKS, model_errors, train
from experiments.lm.config import parse_run_arguments, timestamped_run_dir
from mamba_jax.bench_utils import hardware_description, markdown_table
from mamba_jax.data.function_classes import TASKS, sample_prompts
from mamba_jax.interop import save_pretrained

RESULTS_ROOT = os.path.join("results", "icl")
EVAL_SEED_OFFSET = 10_000  # evaluation prompts come from a key no training step uses


def parse_command_line(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="mamba-jax run icl", description=__doc__.splitlines()[0],
                                     epilog="key=value overrides any ICLConfig field, e.g. num_steps=200 d=5")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--task", choices=TASKS, default="linear_regression")
    parser.add_argument("--size", choices=tuple(MODEL_SIZES), default=None,
                        help="the papers' model sizes (d_model, layers, heads); key=value overrides still apply")
    parser.add_argument("--out", default=None, help="run directory (default: results/icl/<timestamp>)")
    args, config = parse_run_arguments(parser, argv, lambda a: preset_config(a.preset, a.task, a.size))
    out = args.out or timestamped_run_dir(RESULTS_ROOT)
    return config, out


def report_positions(n: int, trained: int):
    """The in-context example counts the table shows: a few early, the trained length, the longest."""
    return sorted({1, 2, 4, max(1, trained // 2), trained - 1, n - 1} & set(range(n)))


def eval_prompts(config: ICLConfig, x_scale: float = 1.0, stream: int = 0):
    """Held-out prompts at full dimension, `eval_points` long, from a key no training step uses; the same
    functions and inputs for every `x_scale` (only the inputs are scaled). `stream` 1 = the probes' fit set."""
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + EVAL_SEED_OFFSET), stream)
    return sample_prompts(key, config.task, config.eval_prompts, config.eval_points, config.d, x_scale=x_scale)


def evaluate_all(config: ICLConfig, trained: Dict[str, Any], x_scale: float = 1.0) -> Dict[str, list]:
    """{name: per-position normalised error} for every model and baseline, on the same prompts."""
    xs, ys = eval_prompts(config, x_scale)
    errors = {}
    for name, (model, params) in trained.items():
        errors[name] = model_errors(model, params, xs, ys, config.task, config.d, x_scale=x_scale).tolist()
    for name, baseline in BASELINES_FOR_TASK[config.task]:
        errors[name] = squared_error(baseline(xs, ys), ys, config.task, config.d, x_scale=x_scale).tolist()
    return errors


def probe_all(config: ICLConfig, trained: Dict[str, Any]) -> Dict[str, Any]:
    """Per-layer affine-probe errors {model: (n_layer + 1, n)} (probes fitted on a second held-out set) and,
    for the linear tasks, gradient descent's per-iteration errors on the evaluation prompts."""
    fit_xs, fit_ys = eval_prompts(config, stream=1)
    xs, ys = eval_prompts(config)
    layers = {name: probe.probe_errors(probe.layer_predictions(model, params, fit_xs, fit_ys), fit_ys,
                                       probe.layer_predictions(model, params, xs, ys), ys, config.task, config.d)
              for name, (model, params) in trained.items()}
    out = dict(layers={name: e.tolist() for name, e in layers.items()})
    if config.task in LINEAR_TASKS:
        depth = max(e.shape[0] - 1 for e in layers.values())
        gd = probe.gradient_descent_errors(xs, ys, config.task, config.d, num_steps=max(depth, 8),
                                           fit=(fit_xs, fit_ys))
        out["gradient_descent"] = dict(step_size=gd["step_size"], errors=gd["errors"].tolist())
    return out


def plot_errors(errors: Dict[str, list], path: str, *, title: str, trained_points: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in errors.items():
        ax.plot(range(len(curve)), curve, label=name, lw=2.2 if name in MODEL_NAMES else 1.2,
                ls="-" if name in MODEL_NAMES else "--")
    ax.axvline(trained_points - 1, color="grey", lw=0.8, ls=":", label="trained length")
    ax.set_xlabel("in-context examples")
    ax.set_ylabel("squared error / d")
    ax.set_ylim(0, 1.25)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_positions(config: ICLConfig):
    """The example counts the probe figure shows: d (where least squares becomes exact) and the trained length."""
    return sorted({min(config.d, config.points_end - 1), config.points_end - 1})


def plot_probes(probes: Dict[str, Any], path: str, *, title: str, positions) -> None:
    """Per-layer probe error against depth beside gradient descent's error against iterations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(positions), figsize=(5.2 * len(positions), 3.8), squeeze=False)
    for ax, pos in zip(axes[0], positions):
        for name, errors in probes["layers"].items():
            curve = [row[pos] for row in errors]
            ax.plot(range(len(curve)), curve, marker="o", lw=2, label=f"{name} (layer)")
        if "gradient_descent" in probes:
            gd = probes["gradient_descent"]
            curve = [row[pos] for row in gd["errors"]]
            ax.plot(range(len(curve)), curve, ls="--", marker="x", color="black",
                    label=f"gradient descent (η={gd['step_size']:g}, iteration)")
        ax.set_xlabel("layer / gradient-descent iteration")
        ax.set_ylabel("squared error / d (affine probe)")
        ax.set_title(f"{title}: {pos} in-context examples")
        ax.set_ylim(0, 1.25)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def garg_ood_settings(config: ICLConfig) -> Dict[str, Tuple[str, float]]:
    """{label: (setting, scale)} of Garg et al.'s linear-regression suite, the scales from `ood_scales`."""
    plain = ("standard", "random_quadrants", "orthogonal_train_test", "overlapping_train_test", "half_subspace",
             "skewed", "noisy_linear_regression")
    scaled = {f"{axis}={s:g}": (axis, s) for axis in ("scale_x", "scale_y") for s in config.x_scales()}
    return {**{name: (name, 1.0) for name in plain}, **scaled}


def garg_ood_errors(config: ICLConfig, trained: Dict[str, Any]) -> Dict[str, Dict[str, list]]:
    """{setting: {model or baseline: per-position error ÷ d}} on Garg et al.'s suite (linear regression): a
    prompt counts at its query position (`garg_ood_prompts`); None where no prompt queries a position."""
    from mamba_jax.data.function_classes import garg_ood_prompts

    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + EVAL_SEED_OFFSET), 2)
    applies = {name: jax.jit(model.apply) for name, (model, _) in trained.items()}   # one compile per shape
    out = {}
    for i, (label, (setting, scale)) in enumerate(garg_ood_settings(config).items()):
        xs, ys, query = garg_ood_prompts(jax.random.fold_in(key, i), setting, config.eval_prompts,
                                         config.eval_points, config.d, scale=scale)
        preds = {name: np.asarray(applies[name]({"params": params}, xs, ys))
                 for name, (model, params) in trained.items()}
        preds.update({name: baseline(xs, ys) for name, baseline in BASELINES_FOR_TASK[config.task]})
        ys, query = np.asarray(ys, np.float64), np.asarray(query)
        counts = np.stack([(query == i) | (query == -1) for i in range(config.eval_points)], 1)   # (m, n)
        out[label] = {name: [float(v) if c else None for v, c in zip(
            ((p - ys) ** 2 * counts).sum(0) / np.maximum(counts.sum(0), 1) / config.d, counts.any(0))]
            for name, p in preds.items()}
    return out


def results_markdown(config: ICLConfig, errors: Dict[str, list], scaled: Dict[float, Dict[str, list]] = None,
                     probes: Dict[str, Any] = None, garg_ood: Dict[str, Dict[str, list]] = None) -> str:
    positions = report_positions(config.eval_points, config.points_end)
    rows = [[name] + [errors[name][i] for i in positions] for name in errors]
    header = ["model / baseline"] + [f"{i} examples" for i in positions]
    text = (f"### ICL `{config.task}`, d = {config.d}, preset `{config.preset}`\n\n"
            f"Normalised squared error (1 = predicting 0), {config.eval_prompts} held-out prompts; trained on "
            f"up to {config.points_end} examples (later columns are out of distribution).\n\n"
            + markdown_table(header, rows) + "\n")
    at = config.points_end - 1
    if scaled:
        columns = sorted(set(scaled) | {1.0})
        by_scale = {**scaled, 1.0: errors}
        rows = [[name] + [by_scale[s][name][at] for s in columns] for name in errors]
        text += (f"\nOut of distribution, inputs scaled (x → s·x, same functions), at {at} examples; error "
                 f"normalised by E[y²] at that scale:\n\n"
                 + markdown_table(["model / baseline"] + [f"s = {s:g}" for s in columns], rows) + "\n")
    if garg_ood:
        names = list(next(iter(garg_ood.values())))
        cols = [i for i in (config.d // 2, config.d, at) if i < config.eval_points]
        cols = sorted(set(cols))
        fmt = lambda v: "—" if v is None else v                                  # noqa: E731
        rows = [[label] + [fmt(garg_ood[label][n][i]) for n in names for i in cols] for label in garg_ood]
        text += (f"\nGarg et al.'s out-of-distribution suite (squared error ÷ d, as their plots), at "
                 f"{', '.join(map(str, cols))} examples (—: no query there):\n\n"
                 + markdown_table(["setting"] + [f"{n} @{i}" for n in names for i in cols], rows) + "\n")
    if probes:
        depth = max(len(e) for e in probes["layers"].values())
        rows = [[name] + [e[i][at] if i < len(e) else "" for i in range(depth)]
                for name, e in probes["layers"].items()]
        if "gradient_descent" in probes:
            gd = probes["gradient_descent"]
            rows.append([f"gradient descent, η = {gd['step_size']:g}"] + [gd["errors"][i][at] for i in range(depth)])
        text += (f"\nProbes at {at} examples: each layer's residual stream through the final norm and read-out, "
                 f"then a 1-D affine probe fitted on other held-out prompts (column i = after layer i, or after "
                 f"i gradient-descent iterations from w = 0):\n\n"
                 + markdown_table(["model"] + [str(i) for i in range(depth)], rows) + "\n")
    return text + f"\n{hardware_description()}\n"


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
                               learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
                               seed=config.seed + i,
                               log_every=config.log_every, progress=config.progress, name=name)
        trained[name], histories[name] = (model, state.params), history
    for name, (model, params) in trained.items():
        save_pretrained(model, params, os.path.join(out, "models", name))
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for name, history in histories.items():
            for record in history:
                f.write(json.dumps(dict(model=name, **record)) + "\n")
    errors = evaluate_all(config, trained)
    scaled = {s: evaluate_all(config, trained, x_scale=s) for s in config.x_scales()}
    probes = probe_all(config, trained) if config.probe else None
    garg_ood = garg_ood_errors(config, trained) if config.task == "linear_regression" else None
    table = results_markdown(config, errors, scaled, probes, garg_ood)
    results = dict(config=dataclasses.asdict(config), errors=errors,
                   ood_scaled={f"{s:g}": e for s, e in scaled.items()}, garg_ood=garg_ood, probes=probes,
                   final_train_loss={name: h[-1]["loss"] for name, h in histories.items()},
                   hardware=hardware_description())
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    title = f"{config.task}, d = {config.d}"
    plot_errors(errors, os.path.join(out, "errors.png"), title=title, trained_points=config.points_end)
    if probes:
        plot_probes(probes, os.path.join(out, "probes.png"), title=title, positions=probe_positions(config))
    print(table)
    print(f"wrote {out}/results.md, results.json, errors.png" + (", probes.png" if probes else ""))
    return 0
