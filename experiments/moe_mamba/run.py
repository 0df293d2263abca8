"""`mamba-jax run moe_mamba`: Mamba vs MoE-Mamba on byte-level text: steps-to-loss speedup and ablations.

Plain Mamba against MoE-Mamba (Pióro et al., arXiv 2401.04081) with the paper's steps-to-loss speedup and
expert-count / routing / capacity ablations.

    mamba-jax run moe_mamba [--preset smoke|cpu|paper] [--out DIR] [key=value ...]

Every arm (`arms`, see `experiments/moe_mamba/config.py`) trains from the same seed on the same batches (the
`lm` experiment's `TextData`: the standard library's sources, byte tokenizer, packed rows with seq_idx; batch
i is a pure function of (seed, i)), with the same optimizer and tokens per step, and is evaluated on the same
held-out rows every `eval_every` steps. The paper's measure, per MoE arm:

    speedup(l) = steps Mamba needs to reach loss l / steps the MoE arm needs to reach l

on the EMA-smoothed training cross-entropy (`ema_smooth`, `steps_to_reach`, `speedup_at`), reported at
Mamba's final smoothed loss beside the paper's 2.35x (100M) / 1.76x (25M), and the same on the held-out loss.

Writes `results/moe_mamba/<timestamp>/` (or ``--out``): config.json (the resolved config, also printed),
arms/<arm>/metrics.jsonl (+ tensorboard/), results.json, results.md (printed at the end), loss_vs_steps.png
and speedup_vs_loss.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.lm.config import parse_run_arguments, timestamped_run_dir
from experiments.moe_mamba.config import BASELINE, E1_CONTROL, PRESETS, MoEMambaConfig, arm_settings, preset_config
from mamba_jax.bench_utils import mean_and_sd

RESULTS_ROOT = os.path.join("results", "moe_mamba")

# The paper's headline (Pióro et al. 2024, arXiv 2401.04081): MoE-Mamba reaches Mamba's final loss in this
# many times fewer training steps.
PAPER_SPEEDUP = {"100m": 2.35, "25m": 1.76}
# The paper's experts ablation (v1, arXiv 2401.04081v1; the authors' post llm-random.github.io
# posts/moe_mamba): experts -> (loss after 100k steps, % of the steps vanilla Mamba needs for its loss);
# vanilla Mamba: 3.51. Parameter counts there exclude embeddings; 26M active per token.
PAPER_EXPERTS_V1 = {1: (3.56, ">100%"), 4: (3.55, ">100%"), 8: (3.51, "91%"), 16: (3.45, "56%"),
                    32: (3.41, "46%")}
PAPER_MAMBA_LOSS_V1 = 3.51


def parse_command_line(argv: Sequence[str]) -> Tuple[MoEMambaConfig, str]:
    """(resolved config, run directory); a bad flag, key or value exits with a usage error (2)."""
    parser = argparse.ArgumentParser(prog="mamba-jax run moe_mamba", description=__doc__.splitlines()[0],
                                     epilog="key=value (or --config.key=value) overrides any MoEMambaConfig field, "
                                            "e.g. arms=mamba,moe,moe_e16 num_steps=200")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--out", default=None, help="run directory (default: results/moe_mamba/<timestamp>)")
    args, config = parse_run_arguments(parser, argv, lambda a: preset_config(a.preset))
    return config, args.out or timestamped_run_dir(RESULTS_ROOT)


# ------------------------------------------------------------------------------------ the speedup measure


def ema_smooth(values: Sequence[float], beta: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): m_t = β·m_{t−1} + (1−β)·x_t from
    m_0 = 0, divided by 1 − β^(t+1). values: (n,) -> (n,) float64; β = 0 returns the values."""
    x = np.asarray(values, np.float64)
    out, m = np.empty_like(x), 0.0
    for t, v in enumerate(x):
        m = beta * m + (1.0 - beta) * v
        out[t] = m / (1.0 - beta ** (t + 1))
    return out


def steps_to_reach(steps: Sequence[float], losses: Sequence[float], level: float) -> float:
    """The first step at which the curve (steps (n,) increasing, losses (n,)) is at or below `level`,
    linearly interpolated between the two points around the crossing; ``math.inf`` when it never gets there.
    """
    s, y = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
    if s.shape != y.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps_to_reach: `steps` and `losses` must be equal-length 1-D sequences; got shapes "
                         f"{s.shape} and {y.shape}")
    hit = np.nonzero(y <= level)[0]
    if hit.size == 0:
        return math.inf
    i = int(hit[0])
    if i == 0:
        return float(s[0])
    frac = (y[i - 1] - level) / (y[i - 1] - y[i])        # y[i-1] > level >= y[i]
    return float(s[i - 1] + frac * (s[i] - s[i - 1]))


def speedup_at(base: Tuple[Sequence[float], Sequence[float]], other: Tuple[Sequence[float], Sequence[float]],
               level: float) -> float:
    """steps_to_reach(base, level) / steps_to_reach(other, level) for (steps, losses) curves.

    ``math.inf`` when only `other` reaches the level (a speedup larger than the run can show); ``math.nan``
    when `other` does not reach it (not measurable: "not reached")."""
    b, o = steps_to_reach(*base, level), steps_to_reach(*other, level)
    if math.isinf(o):
        return math.nan
    if math.isinf(b):
        return math.inf
    return b / o if o > 0 else math.inf


def speedup_curve(base, other, levels: Sequence[float]) -> List[float]:
    """`speedup_at` at each loss in `levels`."""
    return [speedup_at(base, other, float(level)) for level in levels]


def arm_curves(records: List[Dict[str, Any]], ema: float) -> Dict[str, np.ndarray]:
    """From one arm's metrics records: train steps (n,), raw and smoothed train loss (n,), eval steps (m,)
    and eval loss (m,)."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    loss = np.array([r["loss"] for r in train], np.float64)
    return {"steps": np.array([r["step"] for r in train], np.float64), "loss": loss,
            "smoothed": ema_smooth(loss, ema),
            "eval_steps": np.array([r["step"] for r in evals], np.float64),
            "eval_loss": np.array([r["eval_loss"] for r in evals], np.float64)}


def train_tokens_per_s(records: List[Dict[str, Any]]) -> Optional[float]:
    """Median tokens/s of the train step over the train records after the first (which holds the jit
    compile); None with fewer than two records."""
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
    return float(statistics.median(rates)) if rates else None


def _finite(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


# -------------------------------------------------------------------------------------------- the runs


def train_arm(config: MoEMambaConfig, arm: str, text, out: str) -> Dict[str, Any]:
    """Train and evaluate one arm; its records go to <out>/arms/<arm>/metrics.jsonl. Returns the arm's
    summary: parameter counts, records, and measured numbers."""
    import jax

    from mamba_jax.models import HybridLM, MambaLM, init_params
    from mamba_jax.models.moe_mamba import parameter_counts
    from mamba_jax.train import (MetricsWriter, create_train_state, evaluate, learning_rate_schedule,
                                 make_eval_step, make_optimizer, make_train_step, train_loop)

    arm_dir = os.path.join(out, "arms", arm)
    summary_path = os.path.join(arm_dir, "summary.json")
    if os.path.isfile(summary_path):          # a finished arm of an interrupted run with the same settings
        with open(summary_path) as f:
            saved = json.load(f)
        if saved.get("config") == _resume_key(config):
            print(f"moe_mamba: arm {arm}: done before, read from {summary_path}", file=sys.stderr)
            return saved["summary"]
    lm = config.lm_config()
    model_config = config.model_config(arm)
    model = (MambaLM if arm == BASELINE else HybridLM)(model_config)
    params = init_params(model, jax.random.PRNGKey(config.seed), seq_len=config.seq_len)
    counts = parameter_counts(model_config, params)
    state = create_train_state(model.apply, params, make_optimizer(lm.optimizer_config()))
    eval_step = make_eval_step(model.apply)
    metrics = MetricsWriter(os.path.join(arm_dir, "metrics.jsonl"),
                            tensorboard_dir=os.path.join(arm_dir, "tensorboard") if config.tensorboard else None)
    print(f"moe_mamba: arm {arm}: {counts['total']:,} parameters, {counts['active']:,} active per token",
          file=sys.stderr)
    t0 = time.perf_counter()
    # the MoE router jitter's per-step keys: fold_in(fold_in(PRNGKey(seed), 1), step), deterministic given the seed
    train_step = make_train_step(learning_rate_schedule(lm.optimizer_config()),
                                 rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    _, history = train_loop(state, train_step, text.batch,
                            lm.loop_config(), metrics=metrics,
                            evaluate_fn=lambda s: text.add_bits_per_byte(evaluate(eval_step, s.params,
                                                                                  text.eval_batches)))
    metrics.close()
    train = [r for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    curves = arm_curves(history, config.ema)
    dropped = [r["moe_dropped_fraction"] for r in train if "moe_dropped_fraction" in r]
    prefix = "moe_dropped_fraction_"
    layers = sorted({k[len(prefix):] for r in train for k in r if k.startswith(prefix)},
                    key=lambda name: int(name.rsplit("_", 1)[-1]))
    dropped_by_layer = {layer: float(np.mean([r[prefix + layer] for r in train if prefix + layer in r]))
                        for layer in layers}
    summary = {
        "arm": arm, "params_total": counts["total"], "params_active": counts["active"],
        "params_expert": counts["expert"], "records": history,
        "final_train_loss": float(curves["smoothed"][-1]), "final_train_loss_raw": float(train[-1]["loss"]),
        "final_eval_loss": float(evals[-1]["eval_loss"]),
        "final_eval_bits_per_byte": float(evals[-1]["eval_bits_per_byte"]),
        "tokens_per_s": train_tokens_per_s(history),
        # the baseline has no router
        "dropped_fraction": float(np.mean(dropped)) if dropped else None,
        "dropped_fraction_by_layer": dropped_by_layer,     # mean over the run, per MoE layer
        "wall_time_s": time.perf_counter() - t0,
    }
    with open(summary_path, "w") as f:
        json.dump({"config": _resume_key(config), "summary": summary}, f)
    return summary


def _resume_key(config: MoEMambaConfig) -> Dict[str, Any]:
    """What must match for a finished arm to be reused: every field but the run's arm list, seed count and
    display switches."""
    return {k: v for k, v in config.to_dict().items() if k not in ("arms", "seeds", "progress", "tensorboard")}


def compare(arms: List[Dict[str, Any]], ema: float, baseline: str = BASELINE, suffix: str = "") -> Dict[str, Any]:
    """Speedups of every other arm against the `baseline` arm (when it ran; default ``mamba``): at the
    baseline's final smoothed train loss and final eval loss, and speedup-vs-loss curves over its smoothed
    loss range (from its value at 10 % of the steps down to its final value, 40 levels). Adds
    ``speedup<suffix>``/``speedup_eval<suffix>`` to each other arm's summary (None: not reached); the
    ``moe_e1`` control is compared with suffix ``_vs_e1``."""
    base = next((a for a in arms if a["arm"] == baseline), None)
    if base is None:
        return {"levels": [], "curves": {}}
    bc = arm_curves(base["records"], ema)
    level, eval_level = float(bc["smoothed"][-1]), float(bc["eval_loss"][-1])
    start = float(bc["smoothed"][max(0, int(0.1 * len(bc["smoothed"])) - 1)])
    levels = np.linspace(start, level, 40).tolist()
    curves = {}
    for a in arms:
        if a["arm"] in (baseline, BASELINE):
            continue
        c = arm_curves(a["records"], ema)
        train_pair, eval_pair = (c["steps"], c["smoothed"]), (c["eval_steps"], c["eval_loss"])
        a["speedup" + suffix] = _finite(speedup_at((bc["steps"], bc["smoothed"]), train_pair, level))
        a["speedup_eval" + suffix] = _finite(speedup_at((bc["eval_steps"], bc["eval_loss"]), eval_pair, eval_level))
        if suffix:
            continue
        a["steps_to_mamba_final"] = _finite(steps_to_reach(*train_pair, level))
        a["eval_steps_to_mamba_final"] = _finite(steps_to_reach(*eval_pair, eval_level))
        curves[a["arm"]] = [_finite(x) for x in speedup_curve((bc["steps"], bc["smoothed"]), train_pair, levels)]
    return {"level": level, "eval_level": eval_level,
            "mamba_steps_to_final": steps_to_reach(bc["steps"], bc["smoothed"], level),
            "levels": levels, "curves": curves}


def seed_configs(config: MoEMambaConfig) -> List[MoEMambaConfig]:
    """One config per seed: seed, seed + 1, ..., seed + seeds − 1 (each arm's init, batches and router keys)."""
    return [dataclasses.replace(config, seed=config.seed + i) for i in range(config.seeds)]


SEED_METRICS = ("final_train_loss", "final_eval_loss", "speedup", "speedup_eval", "speedup_vs_e1",
                "dropped_fraction")


def across_seeds(by_seed: List[List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per arm, over the seeds' arm summaries (by_seed[s] = that seed's arms): for each of SEED_METRICS the
    per-seed values (``<metric>_by_seed``, None where not reached or not measured) and their mean and
    sample sd (None when a seed lacks the value)."""
    out = {}
    for arm in [a["arm"] for a in by_seed[0]]:
        entries = [next(a for a in arms if a["arm"] == arm) for arms in by_seed]
        row = {"params_total": entries[0]["params_total"], "params_active": entries[0]["params_active"]}
        for metric in SEED_METRICS:
            values = [e.get(metric) for e in entries]
            row[metric + "_by_seed"] = values
            row[metric + "_mean"], row[metric + "_sd"] = mean_and_sd(values)
        out[arm] = row
    return out


def experts_ablation(config: MoEMambaConfig, by_seed: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The paper's experts ablation from the arms that differ from ``moe`` only in their expert count (``moe``
    itself at `n_experts`, ``moe_e<N>``): one row per count, ascending, with `across_seeds`' statistics;
    [] with fewer than two such arms."""
    stats = across_seeds(by_seed)
    counts = {}
    for arm in stats:
        settings = arm_settings(arm)
        if arm == "moe" or set(settings) == {"n_experts"}:
            counts.setdefault(settings.get("n_experts", config.sizes()["n_experts"]), arm)
    if len(counts) < 2:
        return []
    return [dict(n_experts=n, arm=counts[n], **stats[counts[n]]) for n in sorted(counts)]


# ---------------------------------------------------------------------------------------------- reports


def _fmt(x, spec: str = ".4f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def results_markdown(results: Dict[str, Any]) -> str:
    """The results table (every arm) and the headline speedup beside the paper's, as markdown."""
    from mamba_jax.bench_utils import markdown_table

    cfg, cmp_ = results["config"], results["comparison"]
    sizes = results["sizes"]
    lines = [f"# moe_mamba ({cfg['preset']} preset)", "",
             f"{'Byte-level' if _unit(cfg) == 'byte' else 'BPE'} text: {results['data']['train_files']} training files of the Python standard library "
             f"({results['data']['train_tokens']:,} tokens), {results['data']['eval_files']} held out "
             f"({results['data']['eval_rows']} rows of {cfg['seq_len']} evaluated). Every arm: seed {cfg['seed']}, the "
             f"same batches, {cfg['num_steps']} steps × {cfg['batch_size']} × {cfg['seq_len']} tokens. MoE-Mamba: "
             f"d_model {sizes['d_model']}, {sizes['n_blocks']} × (Mamba, MoE), {sizes['n_experts']} experts "
             f"(d_expert {cfg.get('d_expert') or '3·d_model'}), router {cfg['router']}, capacity factor {cfg['capacity_factor']} per "
             f"{'batch (position-major)' if cfg.get('routing', 'sequence') == 'batch' else 'sequence'}; Mamba: "
             f"{2 * sizes['n_blocks']} Mamba layers. Train loss = EMA (β = {cfg['ema']}, debiased) of the training "
             f"cross-entropy (nats/{_unit(cfg)}); eval loss = held-out cross-entropy.", ""]
    rows = []
    for a in results["arms"]:
        speed = "1 (baseline)" if a["arm"] == BASELINE else (
            "not reached" if a.get("speedup") is None else f"{a['speedup']:.2f}x")
        speed_eval = "1 (baseline)" if a["arm"] == BASELINE else (
            "not reached" if a.get("speedup_eval") is None else f"{a['speedup_eval']:.2f}x")
        vs_e1 = "—" if a["arm"] in (BASELINE, E1_CONTROL) or "speedup_vs_e1" not in a else (
            "not reached" if a["speedup_vs_e1"] is None else f"{a['speedup_vs_e1']:.2f}x")
        rows.append([a["arm"], f"{a['params_total']:,}", f"{a['params_active']:,}", f"{a['final_train_loss']:.4f}",
                     f"{a['final_eval_loss']:.4f}", speed, speed_eval, vs_e1, _fmt(a["tokens_per_s"], ",.0f"),
                     _fmt(a["dropped_fraction"], ".3f"),
                     " / ".join(f"{v:.3f}" for v in (a.get("dropped_fraction_by_layer") or {}).values()) or "—"])
    lines += [markdown_table(["arm", "total params", "active params/token", "final train loss (EMA)",
                              "final eval loss", "speedup vs Mamba (train)", "speedup vs Mamba (eval)",
                              "speedup vs moe_e1 (train)", "train tokens/s", "dropped-token fraction",
                              "dropped per MoE layer (first → last)"], rows), ""]
    lines += seeds_markdown(results)
    if cmp_.get("curves"):
        main = next((a for a in results["arms"] if a["arm"] == "moe"), None)
        ours = "—" if main is None else ("not reached" if main.get("speedup") is None else f"{main['speedup']:.2f}x")
        lines += [f"Speedup = steps Mamba needs to reach a loss / steps the MoE arm needs, at Mamba's final loss "
                  f"(train {cmp_['level']:.4f}, reached by Mamba at step {cmp_['mamba_steps_to_final']:.1f}; eval "
                  f"{cmp_['eval_level']:.4f}, interpolated between evaluations every {cfg['eval_every']} steps). "
                  f"\"not reached\": the arm's loss never got that low in {cfg['num_steps']} steps.", "",
                  f"**MoE-Mamba (`moe`) vs Mamba: {ours}** (ours, {cfg['preset']} preset) — the paper reports "
                  f"{PAPER_SPEEDUP['100m']}x (100M setting) and {PAPER_SPEEDUP['25m']}x (25M setting) on C4 "
                  f"after far longer training (Pióro et al., arXiv 2401.04081)."]
        if cfg["preset"] != "paper":
            lines += ["", f"Scale note: this is the `{cfg['preset']}` preset — models of "
                          f"{min(a['params_active'] for a in results['arms']):,}–"
                          f"{max(a['params_total'] for a in results['arms']):,} parameters trained for "
                          f"{cfg['num_steps']} steps, orders of magnitude below the paper; it checks the "
                          f"pipeline and the direction of the effect, not the paper's number."]
    lines += ["", "Dropped-token fraction: mean over training steps of the tokens that found their chosen "
                  "expert full (averaged over MoE layers). Tokens/s: median over logged train steps after the first (jit), this machine.",
              "", results["hardware"], ""]
    return "\n".join(lines)


def _speedups(values: Sequence[Optional[float]]) -> str:
    return " / ".join("not reached" if v is None else f"{v:.2f}x" for v in values)


def _spread(row: Dict[str, Any], metric: str) -> str:
    mean, sd = row.get(metric + "_mean"), row.get(metric + "_sd")
    return "—" if mean is None else f"{mean:.4f} ± {sd:.4f}"


def seeds_markdown(results: Dict[str, Any]) -> List[str]:
    """With several seeds: every arm's mean ± sd over seeds and its per-seed speedups; with the expert-count
    arms: the experts ablation (the paper's table). [] when neither applies."""
    from mamba_jax.bench_utils import markdown_table

    lines = []
    seeds = [b["seed"] for b in results.get("by_seed", [])]
    stats = results.get("across_seeds", {})
    if len(seeds) > 1:
        lines += [f"Across seeds {', '.join(map(str, seeds))} (mean ± sample sd; speedups per seed, in seed "
                  f"order; the table above is seed {seeds[0]}):", ""]
        rows = [[arm, _spread(r, "final_train_loss"), _spread(r, "final_eval_loss"),
                 "1 (baseline)" if arm == BASELINE else _speedups(r["speedup_by_seed"]),
                 "1 (baseline)" if arm == BASELINE else _speedups(r["speedup_eval_by_seed"]),
                 "—" if arm in (BASELINE, E1_CONTROL) or E1_CONTROL not in stats
                 else _speedups(r["speedup_vs_e1_by_seed"]),
                 _fmt(r["dropped_fraction_mean"], ".3f")]
                for arm, r in stats.items()]
        lines += [markdown_table(["arm", "final train loss (EMA)", "final eval loss", "speedup vs Mamba (train)",
                                  "speedup vs Mamba (eval)", "speedup vs moe_e1 (train)",
                                  "dropped-token fraction"], rows), ""]
    ablation = results.get("experts_ablation") or []
    if ablation:
        lines += [f"Experts ablation (the paper's table of expert counts; {len(seeds) or 1} seed(s)):", ""]
        rows = [[r["n_experts"], r["arm"], f"{r['params_total']:,}", f"{r['params_active']:,}",
                 _spread(r, "final_eval_loss"), _speedups(r["speedup_by_seed"]),
                 "1 (control)" if r["arm"] == E1_CONTROL else
                 "—" if E1_CONTROL not in stats else _speedups(r["speedup_vs_e1_by_seed"]),
                 _fmt(r["dropped_fraction_mean"], ".3f"),
                 "—" if r["n_experts"] not in PAPER_EXPERTS_V1 else
                 "{} / {}".format(*PAPER_EXPERTS_V1[r["n_experts"]])] for r in ablation]
        lines += [markdown_table(["experts", "arm", "total params", "active params/token", "final eval loss",
                                  "speedup vs Mamba (train)", "speedup vs moe_e1 (train)",
                                  "dropped-token fraction",
                                  "paper v1: loss @100k / % of Mamba's steps to its loss"], rows), "",
                  f"The paper's column: MoE-Mamba v1 (arXiv 2401.04081v1), 26M active parameters, C4, 100k steps; "
                  f"vanilla Mamba's loss there {PAPER_MAMBA_LOSS_V1} (a % under 100 is a speedup: 46 % = 2.2x).",
                  ""]
    return lines


def plot_losses(results: Dict[str, Any], path: str) -> None:
    """Loss vs steps: smoothed training loss of every arm (left, raw faint) and held-out loss (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    for a in results["arms"]:
        c = arm_curves(a["records"], results["config"]["ema"])
        style = dict(color="black", lw=2) if a["arm"] == BASELINE else {}
        line, = ax_train.plot(c["steps"], c["smoothed"], label=a["arm"], **style)
        ax_train.plot(c["steps"], c["loss"], color=line.get_color(), alpha=0.15, lw=0.8)
        ax_eval.plot(c["eval_steps"], c["eval_loss"], "o-", color=line.get_color(), label=a["arm"], ms=3)
    ax_train.set(xlabel="step", ylabel=f"cross-entropy (nats/{_unit(results['config'])})",
                 title=f"training loss (EMA β={results['config']['ema']})")
    ax_eval.set(xlabel="step", ylabel=f"cross-entropy (nats/{_unit(results['config'])})", title="held-out loss")
    ax_train.legend(fontsize=7)
    ax_eval.legend(fontsize=7)
    fig.suptitle(f"Mamba vs MoE-Mamba ({results['config']['preset']} preset)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_speedup(results: Dict[str, Any], path: str) -> None:
    """Speedup vs loss level (x: Mamba's smoothed training loss, decreasing to the right) for each MoE arm,
    with the paper's 2.35x / 1.76x as reference lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cmp_ = results["comparison"]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for arm, curve in cmp_.get("curves", {}).items():
        y = [np.nan if v is None else v for v in curve]
        ax.plot(cmp_["levels"], y, lw=2 if arm == "moe" else 1, label=arm)
    ax.axhline(1.0, color="black", lw=0.8, label="Mamba (1x)")
    for setting, value in PAPER_SPEEDUP.items():
        ax.axhline(value, linestyle=":", color="grey")
        ax.annotate(f"paper {setting}: {value}x", (0.01, value), xycoords=("axes fraction", "data"), fontsize=7)
    if cmp_.get("levels"):
        ax.set_xlim(cmp_["levels"][0], cmp_["levels"][-1])
    ax.set(xlabel=f"training loss level (nats/{_unit(results['config'])}, EMA)", ylabel="speedup (Mamba steps / MoE steps)",
           title=f"steps-to-loss speedup vs Mamba ({results['config']['preset']} preset)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _unit(cfg: Dict[str, Any]) -> str:
    """The loss's unit: nats per byte (byte tokenizer) or per BPE token."""
    return "byte" if cfg.get("tokenizer", "byte") == "byte" else "token"


# -------------------------------------------------------------------------------------------------- main


def run(config: MoEMambaConfig, out: str) -> Dict[str, Any]:
    """Run every arm of `config`, write every output under `out`, return the results dict."""
    from experiments.lm.run import TextData
    from mamba_jax.bench_utils import hardware_description

    os.makedirs(out, exist_ok=True)
    resolved = json.dumps(config.to_dict(), indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(resolved)
    print(f"moe_mamba: resolved config ({out}/config.json):\n{resolved}", file=sys.stderr)
    t0 = time.perf_counter()
    # resume=True: a rerun into the same directory reads the BPE tokenizer it trained (same ids) and every
    # finished arm (`train_arm`)
    text = TextData(config.lm_config(), out, resume=True)
    by_seed = []
    for cfg in seed_configs(config):
        seed_out = out if config.seeds == 1 else os.path.join(out, f"seed_{cfg.seed}")
        seed_text = text if cfg.seed == config.seed else TextData(cfg.lm_config(), seed_out, resume=False,
                                                                   tokenizer=text.tokenizer)
        arms = [train_arm(cfg, arm, seed_text, seed_out) for arm in cfg.arm_names()]
        comparison = compare(arms, cfg.ema)
        compare(arms, cfg.ema, baseline=E1_CONTROL, suffix="_vs_e1")   # adds speedup_vs_e1 where moe_e1 ran
        by_seed.append({"seed": cfg.seed, "arms": arms, "comparison": comparison})
    results = {"experiment": "moe_mamba", "config": config.to_dict(), "sizes": config.sizes(),
               "data": text.summary(), "comparison": by_seed[0]["comparison"], "arms": by_seed[0]["arms"],
               "by_seed": [{"seed": b["seed"], "comparison": b["comparison"],
                            "arms": [{k: v for k, v in a.items() if k != "records"} for a in b["arms"]]}
                           for b in by_seed],
               "across_seeds": across_seeds([b["arms"] for b in by_seed]),
               "experts_ablation": experts_ablation(config, [b["arms"] for b in by_seed]),
               "paper_speedup": PAPER_SPEEDUP, "wall_time_s": time.perf_counter() - t0,
               "hardware": hardware_description()}
    plot_losses(results, os.path.join(out, "loss_vs_steps.png"))
    plot_speedup(results, os.path.join(out, "speedup_vs_loss.png"))
    table = results_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    saved = dict(results, arms=[{k: v for k, v in a.items() if k != "records"} for a in arms])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(saved, f, indent=1)
    print(table)
    print(f"wrote {out}/results.md, results.json, loss_vs_steps.png, speedup_vs_loss.png")
    return saved


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, out = parse_command_line(sys.argv[1:] if argv is None else argv)
    run(config, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
