"""`mamba-jax run icl`: in-context regression, Mamba vs Transformer vs exact baselines.

Trains each model of the config (curriculum of Garg et al.; `seeds` models per arm, vmapped) on prompts
drawn fresh every step, then scores models and baselines on the same held-out prompts at full dimension,
`eval_points` examples long (past the trained length: out of distribution), on Garg et al.'s
out-of-distribution suite (linear regression), and probes every layer (affine probe of the logit lens,
beside gradient-descent iterations). Writes `results/icl/<timestamp>/`: config.json, metrics.jsonl
(training loss per arm and seed), models/<name>/[seed_<s>/] (`save_pretrained`; `load_pretrained` reads
it back), results.json, results.md (the tables, printed at the end; mean ± sd over seeds), errors.png
(normalised squared error against the number of in-context examples), training_loss.png (per arm, the
seeds' band: the plateau and its escape) and probes.png (error against layer depth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from experiments.icl.baselines import BASELINES_FOR_TASK, squared_error
from experiments.icl.config import MODEL_NAMES, MODEL_SIZES, PRESETS, ICLConfig, preset_config
from experiments.icl import probe
from experiments.icl.train import LINEAR_TASKS, model_errors, seed_state, train_seeds
from experiments.lm.config import parse_run_arguments, timestamped_run_dir
from mamba_jax.bench_utils import hardware_description, markdown_table, mean_and_sd
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


def eval_prompts(config: ICLConfig, stream: int = 0):
    """Held-out prompts at full dimension, `eval_points` long, from a key no training step uses (the same for
    every seed of a run). `stream` 1 = the probes' fit set."""
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + EVAL_SEED_OFFSET), stream)
    return sample_prompts(key, config.task, config.eval_prompts, config.eval_points, config.d)


def evaluate_all(config: ICLConfig, trained: Dict[str, Any], baselines: bool = True) -> Dict[str, list]:
    """{name: per-position normalised error} for every model (and baseline), on the same prompts."""
    xs, ys = eval_prompts(config)
    errors = {}
    for name, (model, params) in trained.items():
        errors[name] = model_errors(model, params, xs, ys, config.task, config.d).tolist()
    for name, baseline in BASELINES_FOR_TASK[config.task] if baselines else ():
        errors[name] = squared_error(baseline(xs, ys), ys, config.task, config.d).tolist()
    return errors


def seed_mean(curves: Sequence[Sequence[Optional[float]]]) -> Tuple[list, list]:
    """(mean, standard deviation) over seeds of per-position curves; None where a curve has None."""
    pairs = [mean_and_sd(values, ddof=0) for values in zip(*curves)]
    return [m for m, _ in pairs], [s for _, s in pairs]


def by_seed(per_seed: Sequence[Dict[str, list]]) -> Tuple[Dict[str, list], Dict[str, list]]:
    """[{name: curve} per seed] -> ({name: mean curve}, {name: spread curve}) (`seed_mean`)."""
    pairs = {name: seed_mean([run[name] for run in per_seed]) for name in per_seed[0]}
    return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}


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


def garg_ood_errors(config: ICLConfig, trained: Dict[str, Any], baselines: bool = True) -> Dict[str, Dict[str, list]]:
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
        if baselines:
            preds.update({name: baseline(xs, ys) for name, baseline in BASELINES_FOR_TASK[config.task]})
        ys, query = np.asarray(ys, np.float64), np.asarray(query)
        counts = np.stack([(query == i) | (query == -1) for i in range(config.eval_points)], 1)   # (m, n)
        out[label] = {name: [float(v) if c else None for v, c in zip(
            ((p - ys) ** 2 * counts).sum(0) / np.maximum(counts.sum(0), 1) / config.d, counts.any(0))]
            for name, p in preds.items()}
    return out


def gap_positions(config: ICLConfig) -> list:
    """The example counts of the headline table: d, 2d and twice the trained length (those evaluated)."""
    return sorted({i for i in (config.d, 2 * config.d, 2 * config.points_end - 1) if i < config.eval_points})


def with_spread(value: Optional[float], spread: Optional[Dict[str, list]], name: str, i: int) -> str:
    """`value` as the tables print it, "± sd" over seeds where `spread` has the entry."""
    if value is None:
        return "—"
    sd = spread.get(name) if spread else None
    return f"{value:.3g}" if sd is None or sd[i] is None else f"{value:.3g} ± {sd[i]:.2g}"


def results_markdown(config: ICLConfig, errors: Dict[str, list], probes: Dict[str, Any] = None,
                     garg_ood: Dict[str, Dict[str, list]] = None, spread: Dict[str, list] = None,
                     final_loss: Dict[str, str] = None) -> str:
    """The tables of results.md; `spread` ({model: per-position sd over seeds}) adds "± sd" to the models."""
    positions = report_positions(config.eval_points, config.points_end)
    rows = [[name] + [with_spread(errors[name][i], spread, name, i) for i in positions] for name in errors]
    header = ["model / baseline"] + [f"{i} examples" for i in positions]
    seeds = (f"mean ± standard deviation over {config.seeds} seeds ({config.seed}..{config.seed + config.seeds - 1}), "
             if config.seeds > 1 else "")
    text = (f"### ICL `{config.task}`, d = {config.d}, preset `{config.preset}`\n\n"
            f"Normalised squared error (1 = predicting 0), {seeds}{config.eval_prompts} held-out prompts; trained "
            f"on up to {config.points_end} examples (later columns are out of distribution).\n\n"
            + markdown_table(header, rows) + "\n")
    at = config.points_end - 1
    if config.task in LINEAR_TASKS:
        gaps = gap_positions(config)
        models = [n for n in errors if n in MODEL_NAMES]
        rows = [[name] + [with_spread(errors[name][i] - errors["least_squares"][i], spread, name, i) for i in gaps]
                + ([final_loss[name]] if final_loss else []) for name in models]
        text += (f"\nError above least squares (the optimum on noiseless data: 0 from d = {config.d} examples on) at "
                 f"d, 2d and twice the trained length:\n\n"
                 + markdown_table(["model"] + [f"{i} examples" for i in gaps]
                                  + (["final training loss"] if final_loss else []), rows) + "\n")
    if garg_ood:
        names = list(next(iter(garg_ood.values())))
        cols = [i for i in (config.d // 2, config.d, at) if i < config.eval_points]
        cols = sorted(set(cols))
        fmt = lambda v: "—" if v is None else v                                  # noqa: E731
        rows = [[label] + [fmt(garg_ood[label][n][i]) for n in names for i in cols] for label in garg_ood]
        text += (f"\nGarg et al.'s out-of-distribution suite (squared error ÷ d, as their plots; models: mean over "
                 f"seeds), at "
                 f"{', '.join(map(str, cols))} examples (—: no query there):\n\n"
                 + markdown_table(["setting"] + [f"{n} @{i}" for n in names for i in cols], rows) + "\n")
    if probes:
        depth = max(len(e) for e in probes["layers"].values())
        rows = [[name] + [e[i][at] if i < len(e) else "" for i in range(depth)]
                for name, e in probes["layers"].items()]
        if "gradient_descent" in probes:
            gd = probes["gradient_descent"]
            rows.append([f"gradient descent, η = {gd['step_size']:g}"] + [gd["errors"][i][at] for i in range(depth)])
        text += (f"\nProbes at {at} examples (seed {config.seed}'s models): each layer's residual stream through the final norm and read-out, "
                 f"then a 1-D affine probe fitted on other held-out prompts (column i = after layer i, or after "
                 f"i gradient-descent iterations from w = 0):\n\n"
                 + markdown_table(["model"] + [str(i) for i in range(depth)], rows) + "\n")
    return text + f"\n{hardware_description()}\n"


def least_squares_loss_floor(d: int, n_points: int) -> float:
    """The training loss (mean squared error over the n_points positions of a prompt) of minimum-norm least
    squares on noiseless isotropic linear regression at full size: with j < d examples its error is
    E|w projected off their span|² = d − j, from d examples on 0 — so Σ_j max(d − j, 0) / n_points. The
    floor no model can go below on average (predicting 0 scores d)."""
    return sum(max(d - j, 0) for j in range(n_points)) / n_points


def plot_training_loss(histories: Dict[str, List[list]], path: str, *, title: str, full_size_step: int,
                       floor: Optional[float] = None) -> None:
    """Training loss against step per arm (mean over seeds, the band from the lowest to the highest seed), on
    a log scale, with the step where the curriculum reaches full size: the plateau and its escape; `floor`:
    least squares' loss at full size (`least_squares_loss_floor`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in histories.items():
        steps = [r["step"] for r in runs[0]]
        losses = np.array([[r["loss"] for r in run] for run in runs])
        line, = ax.plot(steps, losses.mean(0), lw=1.8, label=name + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
        if len(runs) > 1:
            ax.fill_between(steps, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2, lw=0)
    ax.axvline(full_size_step, color="grey", lw=0.8, ls=":", label="curriculum at full size")
    if floor is not None:
        ax.axhline(floor, color="black", lw=0.8, ls="--", label="least squares at full size")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (squared error)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, out = parse_command_line([] if argv is None else argv)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    dims, points = config.curricula()
    seeds = list(range(config.seed, config.seed + config.seeds))
    runs, histories = {}, {}          # {name: [(model, params) per seed]}, {name: [history per seed]}
    for name, model in config.build_models().items():
        # every arm trains on the same prompts (seed s: step t's prompts from fold_in(PRNGKey(s), t))
        state, histories[name] = train_seeds(
            model, seeds=seeds, task=config.task, d=config.d, num_steps=config.num_steps,
            batch_size=config.batch_size, dims=dims, points=points, learning_rate=config.learning_rate,
            lr_schedule=config.lr_schedule, log_every=config.log_every, progress=config.progress, name=name)
        runs[name] = [(model, seed_state(state, k).params) for k in range(len(seeds))]
    for name, models in runs.items():
        for seed, (model, params) in zip(seeds, models):
            save_pretrained(model, params,
                            os.path.join(out, "models", name, *([f"seed_{seed}"] if len(seeds) > 1 else [])))
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for name, per_seed in histories.items():
            for seed, history in zip(seeds, per_seed):
                for record in history:
                    f.write(json.dumps(dict(model=name, seed=seed, **record)) + "\n")
    per_seed = [{name: models[k] for name, models in runs.items()} for k in range(len(seeds))]
    errors_by_seed = [evaluate_all(config, trained, baselines=False) for trained in per_seed]
    errors, spread = by_seed(errors_by_seed)
    errors.update(evaluate_all(config, {}))
    probes = probe_all(config, per_seed[0]) if config.probe else None
    garg_ood = None
    if config.task == "linear_regression":
        ood_runs = [garg_ood_errors(config, trained, baselines=k == 0) for k, trained in enumerate(per_seed)]
        garg_ood = {label: {**ood_runs[0][label], **by_seed([{n: run[label][n] for n in runs} for run in ood_runs])[0]}
                    for label in ood_runs[0]}
    final_by_seed = {name: [h[-1]["loss"] for h in hs] for name, hs in histories.items()}
    final_text = {name: f"{np.mean(v):.3g}" + (f" ± {np.std(v):.2g}" if len(v) > 1 else "")
                  for name, v in final_by_seed.items()}
    table = results_markdown(config, errors, probes, garg_ood, spread if len(seeds) > 1 else None, final_text)
    gaps = ({name: {str(i): errors[name][i] - errors["least_squares"][i] for i in gap_positions(config)}
             for name in runs} if config.task in LINEAR_TASKS else None)
    results = dict(config=dataclasses.asdict(config), seeds=seeds, errors=errors, errors_spread=spread,
                   errors_by_seed=errors_by_seed, error_above_least_squares=gaps, garg_ood=garg_ood, probes=probes,
                   final_train_loss={name: float(np.mean(v)) for name, v in final_by_seed.items()},
                   final_train_loss_by_seed=final_by_seed, hardware=hardware_description())
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    title = f"{config.task}, d = {config.d}"
    plot_errors(errors, os.path.join(out, "errors.png"), title=title, trained_points=config.points_end)
    floor = least_squares_loss_floor(config.d, config.points_end) if config.task == "linear_regression" else None
    plot_training_loss(histories, os.path.join(out, "training_loss.png"), title=title,
                       full_size_step=config.full_size_step(), floor=floor)
    if probes:
        plot_probes(probes, os.path.join(out, "probes.png"), title=title, positions=probe_positions(config))
    print(table)
    print(f"wrote {out}/results.md, results.json, errors.png, training_loss.png" + (", probes.png" if probes else ""))
    return 0
