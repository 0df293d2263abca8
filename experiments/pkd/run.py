"""`mamba-jax run pkd`: progressive knowledge distillation of a Mamba image classifier into an anytime
ensemble of small Mamba students (Medina et al., arXiv 2503.01727), beside two single-student arms.

1. Teacher: a larger (bidirectional) `MambaClassifier`, trained with cross-entropy. Its logits on every
   training image are computed once and stored (the teacher is frozen from then on).
2. Progressive ensembles of K small students trained one after another, one ensemble per rule of
   `ensembles` (the first is the main one):
   - "additive" (B-DISTIL, arXiv 2302.10093): F_m = F_{m−1} + f_m in logit space. Student m trains with
     students 1..m−1 frozen (their logits on every training image precomputed, like the teacher's) on
     ``α·CE(F_{m−1} + f_m) + (1−α)·T²·KL(teacher_T ‖ softmax((F_{m−1} + f_m)/T))``: it fits what the
     teacher has and the ensemble so far lacks. The ensemble predicts with the sum of the logits.
   - "mean_softmax": each student's own loss ``α·CE + (1−α)·T²·KL(teacher_T ‖ student_T)``
     (`kd_loss` of `mamba_jax.distill`, per example), per-example weighted by boosting weights
     ``w_i ∝ exp(β·ℓ_i)``, ℓ_i the cross-entropy of the ensemble of students 1..m on example i
     (`boosting_weights`; uniform for the first student); the ensemble predicts with the mean of the
     students' softmaxes.
   Accuracy after 1, 2, ..., K students is the anytime curve of each.
3. "direct": one student whose FLOPs per example match the whole ensemble's (width searched with XLA's
   cost analysis), distilled from the teacher with the same loss and uniform weights; "labels": the
   same architecture trained with cross-entropy only.

Measured per model: parameters; FLOPs per example (XLA `cost_analysis()` of the forward at batch 1,
compiled with the associative scan — XLA counts a while loop's body once, so the sequential CPU scan
would hide the recurrence's FLOPs; `associative` has no loop and is what accelerators run, as
`chunked_associative` with one chunk, for these short sequences); CPU latency at batch 1 and 256 (median
of `latency_repeats` calls, the default CPU scan); peak memory = compiled `memory_analysis()` temporary +
argument bytes at batch 256 (and 1).

Writes `results/pkd/<timestamp>/`: config.json, metrics.jsonl (training losses), models/<name>.msgpack
(students: <rule>_student_<m>)
(flax msgpack params) and models/<name>.json (ClassifierConfig), results.json, results.md (printed at the
end) and accuracy_vs_flops.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
from flax import serialization

from experiments.lm.config import parse_run_arguments, timestamped_run_dir
from experiments.pkd.config import ENSEMBLE_RULES, PRESETS, PKDConfig, preset_config
from mamba_jax.bench_utils import hardware_description, markdown_table, mean_and_sd
from mamba_jax.data.images import fashion_mnist_baselines, image_batches, load_images
from mamba_jax.distill.losses import kd_loss
from mamba_jax.models.classifier import ClassifierConfig, MambaClassifier, classifier_flops, count_params
from mamba_jax.train.optim import OptimizerConfig, make_optimizer
from mamba_jax.train.step import TrainState

RESULTS_ROOT = os.path.join("results", "pkd")
RULE_TEXT = {"additive": "additive (sum of logits, B-DISTIL)",
             "mean_softmax": "mean of softmaxes, boosting weights"}

# The paper's figures (Medina et al., arXiv 2503.01727) on MNIST — not Fashion-MNIST, not our runs.
PAPER_MNIST = [
    dict(model="teacher (paper, MNIST)", flops_fraction=1.0, accuracy=0.98),
    dict(model="7-student ensemble (paper, MNIST)", flops_fraction=0.63, accuracy=0.98),
    dict(model="weakest student (paper, MNIST)", flops_fraction=0.01, accuracy=0.72),
]
# A few rows of the published Fashion-MNIST benchmark table shipped by `dataset-fashion-mnist`.
BASELINE_ROWS = ("Human Performance", "MLP 256-128-100", "GRU+SVM", "2 Conv+pooling", "2 Conv <100K parameters",
                 "WRN40-4 8.9M params")


def parse_command_line(argv: Sequence[str]) -> Tuple[PKDConfig, str]:
    parser = argparse.ArgumentParser(prog="mamba-jax run pkd", description=__doc__.splitlines()[0],
                                     epilog="key=value overrides any PKDConfig field, e.g. teacher_steps=200 "
                                            "student_d_models=8,16")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--out", default=None, help="run directory (default: results/pkd/<timestamp>)")
    args, config = parse_run_arguments(parser, argv, lambda a: preset_config(a.preset))
    return config, args.out or timestamped_run_dir(RESULTS_ROOT)


# ------------------------------------------------------------------------------------------------ losses


def per_example_loss(logits: jax.Array, labels: jax.Array, teacher_logits: Optional[jax.Array], *,
                     alpha: float, temperature: float) -> jax.Array:
    """Per-example PKD loss (b,): ``α·CE(logits, labels) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))``.

    logits, teacher_logits: (b, V) float; labels: (b,) int. With `teacher_logits` None (or α = 1) it is the
    plain cross-entropy. Each example's value is `mamba_jax.distill.kd_loss` on that example alone.
    """
    if teacher_logits is None or alpha == 1.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

    def one(s, y, t):
        loss, _ = kd_loss(s[None], y[None], teacher_logits=t[None], kind="forward_kl", w_kl=1.0 - alpha,
                          w_ce=alpha, temperature=temperature, scale_by_temperature_squared=True)
        return loss

    return jax.vmap(one)(logits, labels, teacher_logits)


def boosting_weights(losses: np.ndarray, beta: float, max_weight: Optional[float] = None) -> np.ndarray:
    """Per-example weights from the current ensemble's per-example losses ℓ (n,).

    w = n · softmax(β·ℓ), i.e. w_i ∝ exp(β·ℓ_i) normalised to mean 1 (β = 0: uniform). With
    `max_weight`, weights are clipped at it and normalised to mean 1 again (once, so a weight may end
    slightly above `max_weight`); this keeps a few hopeless (e.g. mislabelled) examples from taking over.
    With ℓ = −log p_ens(y) and β = 1, w_i ∝ 1 / p_ens(y_i): AdaBoost's exponential reweighting of the
    log-loss. Returns float64 (n,).
    """
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 1 or losses.size == 0:
        raise ValueError(f"boosting_weights: `losses` must be a non-empty 1-D array; got shape {losses.shape}")
    z = beta * losses
    w = np.exp(z - z.max())
    w = w / w.sum() * losses.size
    if max_weight is not None:
        w = np.minimum(w, max_weight)
        w = w / w.sum() * losses.size
    return w


# ---------------------------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=None)
def _train_step(model_config: ClassifierConfig, opt: OptimizerConfig, alpha: float, temperature: float,
                distill: bool):
    """A jitted ``(state, images, labels, teacher_logits, weights, base_logits) -> (state, loss)`` (one per
    setting). The loss is that of ``base_logits + the model's logits``: base_logits (b, V) are the frozen
    logits of an additive ensemble's earlier students (zeros for a model trained alone)."""
    model = MambaClassifier(model_config)

    def step(state, images, labels, teacher_logits, weights, base_logits):
        def loss_fn(params):
            logits = base_logits + model.apply({"params": params}, images)
            per = per_example_loss(logits, labels, teacher_logits if distill else None, alpha=alpha,
                                   temperature=temperature)
            return jnp.sum(weights * per) / jnp.sum(weights)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return jax.jit(step, donate_argnums=(0,))


def predict_probs(model_config: ClassifierConfig, params, images: np.ndarray, batch_size: int,
                  logits: bool = False) -> np.ndarray:
    """Softmax probabilities (or, with `logits`, the logits) (n, n_classes) float32 of `images` (n, H, W),
    in batches of `batch_size` (the last one zero-padded, so one compiled shape serves all). The compiled
    forward is shared with `measure` when this runs on the CPU at batch 256."""
    fn = _compiled_forward((model_config,), batch_size, jax.default_backend())
    n = len(images)
    bs = batch_size
    out = []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        if len(chunk) < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn((params,), chunk), np.float32))
    z = np.concatenate(out)[:n]
    if logits:
        return z
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _init_fn(model_config: ClassifierConfig):
    h, w = model_config.image_height, model_config.image_width
    model = MambaClassifier(model_config)
    # the parameters do not depend on the scan implementation; the reference scan compiles fastest
    model = MambaClassifier(model_config.replace(scan_impl="reference"))
    return jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, h, w), jnp.float32))["params"]))


def init_params(model_config: ClassifierConfig, seed: int):
    """Fresh parameters of a classifier from PRNGKey(seed) (jitted: one compile per config)."""
    return _init_fn(model_config)(jax.random.PRNGKey(seed))


def train_model(name: str, model_config: ClassifierConfig, config: PKDConfig, train: Tuple[np.ndarray, np.ndarray],
                *, steps: int, seed: int, teacher_logits: Optional[np.ndarray] = None,
                weights: Optional[np.ndarray] = None, base_logits: Optional[np.ndarray] = None, pbar=None,
                records: Optional[List[dict]] = None):
    """Train one classifier for `steps` steps on shuffled batches of `train` (images, labels).

    teacher_logits: (n, V) stored teacher logits (the KD term) or None (cross-entropy only).
    weights: (n,) per-example weights (None: uniform). base_logits: (n, V) logits the model's are added to
    before the loss (an additive ensemble's frozen students; None: zeros). Returns the trained params; appends
    {model, step, loss} (mean over the last `log_every` steps) to `records`.
    """
    images, labels = train
    opt = OptimizerConfig(learning_rate=config.learning_rate, warmup_steps=min(config.warmup_steps, steps - 1),
                          total_steps=steps, weight_decay=config.weight_decay, b2=0.99)
    distill = teacher_logits is not None
    step_fn = _train_step(model_config, opt, float(config.alpha), float(config.temperature), distill)
    tx = make_optimizer(opt)
    params = init_params(model_config, seed)
    # = create_train_state(apply, params, tx), with the optimiser state built in one jitted call rather
    # than op by op (each eager op is a separate XLA compile)
    state = TrainState(step=jnp.zeros((), jnp.int32), apply_fn=MambaClassifier(model_config).apply, params=params,
                       tx=tx, opt_state=jax.jit(tx.init)(params))
    data = image_batches(images, labels, batch_size=min(config.batch_size, len(labels)), seed=seed)
    n_classes = model_config.n_classes
    window = []
    for step in range(steps):
        batch = data[step]
        idx = batch["index"]
        t = teacher_logits[idx] if distill else np.zeros((len(idx), n_classes), np.float32)
        w = (np.ones(len(idx), np.float32) if weights is None else weights[idx].astype(np.float32))
        base = np.zeros((len(idx), n_classes), np.float32) if base_logits is None else base_logits[idx]
        state, loss = step_fn(state, batch["image"], batch["label"], t, w, base)
        window.append(loss)
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            mean = float(np.mean([float(x) for x in window]))
            window = []
            if records is not None:
                records.append(dict(model=name, step=step + 1, loss=mean))
            if pbar is not None:
                pbar.set_postfix_str(f"{name} loss {mean:.3f}")
        if pbar is not None:
            pbar.update(1)
    return state.params


# ------------------------------------------------------------------------------------------- measurement


def _first(analysis) -> Dict[str, Any]:
    """`cost_analysis()` returns a dict (recent jax) or a one-element list of dicts (older jax)."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def _cpu():
    return jax.devices("cpu")[0]


def ensemble_prediction(rule: str, logits: Sequence[Any]):
    """An ensemble's prediction from its students' logits [(b, V)] (jnp or numpy): "additive" — their sum
    (logits); "mean_softmax" — the mean of their softmaxes (probabilities)."""
    if rule == "additive":
        return sum(logits)
    if rule == "mean_softmax":
        return sum(jax.nn.softmax(z, axis=-1) for z in logits) / len(logits)
    raise ValueError(f"ensemble_prediction: `rule` must be one of {ENSEMBLE_RULES}; got {rule!r}")


def _forward_fn(configs: Sequence[ClassifierConfig], rule: str = "mean_softmax"):
    """images → the ensemble's prediction (`ensemble_prediction`; one model: its logits). Params: a tuple,
    one per model."""
    models = [MambaClassifier(c) for c in configs]
    if len(models) == 1:
        return lambda params, x: models[0].apply({"params": params[0]}, x)
    return lambda params, x: ensemble_prediction(rule, [m.apply({"params": p}, x) for m, p in zip(models, params)])


def _image_spec(cfg: ClassifierConfig, batch: int):
    return jax.ShapeDtypeStruct((batch, cfg.image_height, cfg.image_width), jnp.float32)


def _param_specs(cfg: ClassifierConfig):
    h, w = cfg.image_height, cfg.image_width
    return jax.eval_shape(lambda: nn.meta.unbox(
        MambaClassifier(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, h, w)))["params"]))


@functools.lru_cache(maxsize=None)
def flops_per_example(configs: Tuple[ClassifierConfig, ...], rule: str = "mean_softmax") -> float:
    """XLA's FLOPs of one forward at batch 1 of a model (or of an ensemble under `rule`), compiled for the
    CPU with the associative scan (no while loop, so every step of the recurrence is counted; see the
    module docstring)."""
    configs = tuple(c.replace(scan_impl="associative") for c in configs)
    params = tuple(_param_specs(c) for c in configs)
    with jax.default_device(_cpu()):
        compiled = jax.jit(_forward_fn(configs, rule)).lower(params, _image_spec(configs[0], 1)).compile()
    return float(_first(compiled.cost_analysis()).get("flops", float("nan")))


@functools.lru_cache(maxsize=None)
def _compiled_forward(configs: Tuple[ClassifierConfig, ...], batch: int, platform: str = "cpu",
                      rule: str = "mean_softmax"):
    """The forward of `configs` (one model: logits; an ensemble: its prediction under `rule`) compiled for
    the first device of `platform` at `batch` (cached)."""
    params = tuple(_param_specs(c) for c in configs)
    with jax.default_device(jax.devices(platform)[0]):
        return jax.jit(_forward_fn(configs, rule)).lower(params, _image_spec(configs[0], batch)).compile()


def measure(configs: Sequence[ClassifierConfig], params: Sequence[Any], repeats: int,
            rule: str = "mean_softmax") -> Dict[str, Any]:
    """params, flops (per example), CPU latency (ms, median of `repeats` calls) at batch 1 and 256, and
    memory (compiled temp + argument bytes) at batch 1 and 256, of a model or an ensemble of models."""
    configs = tuple(configs)
    cpu = _cpu()
    params_cpu = jax.device_put(tuple(params), cpu)
    out: Dict[str, Any] = dict(params=int(sum(count_params(p) for p in params)),
                               flops=flops_per_example(configs, rule),
                               flops_analytic=int(sum(classifier_flops(c) for c in configs)))
    for batch in (1, 256):
        x = jax.device_put(np.zeros((batch, configs[0].image_height, configs[0].image_width), np.float32), cpu)
        compiled = _compiled_forward(configs, batch, "cpu", rule)
        mem = compiled.memory_analysis()
        out[f"memory_bytes_b{batch}"] = (int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)
                                         if mem is not None else None)
        compiled(params_cpu, x).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            compiled(params_cpu, x).block_until_ready()
            times.append(time.perf_counter() - start)
        out[f"latency_ms_b{batch}"] = 1000 * statistics.median(times)
    return out


def match_flops_width(config: PKDConfig, target: float) -> int:
    """The single-student width whose analytic FLOPs per example (`classifier_flops`: matmul multiply-adds
    and the scan, the paper's kind of count) are closest to `target`; they grow with the width."""
    f = lambda w: classifier_flops(config.single_config(w))
    w = 1
    while f(w + 1) < target:
        w += 1
    return w if abs(f(w) - target) <= abs(f(w + 1) - target) else w + 1


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of probabilities/logits (n, V) against labels (n,)."""
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


# ---------------------------------------------------------------------------------------------- reports


def _mb(x) -> str:
    return "" if x is None else f"{x / 2 ** 20:.2f}"


def results_markdown(results: Dict[str, Any]) -> str:
    config = results["config"]
    teacher = results["teacher"]
    tf = teacher["stats"]["flops"]
    lines = [f"### PKD on `{config['dataset']}`, preset `{config['preset']}`", "",
             f"Test accuracy on {results['data']['n_test']} held-out images; FLOPs per example from XLA's cost "
             f"analysis (associative scan); latency on the CPU; memory = compiled temp + argument bytes at batch "
             f"256. Main ensemble: {RULE_TEXT[results['ensemble_rule']]} (α = {config['alpha']}, "
             f"T = {config['temperature']}).", "",
             "Anytime ensemble (accuracy after m students):", ""]
    rows = [[e["m"], e["d_model"], f"{e['accuracy']:.4f}", f"{e['student_accuracy']:.4f}", f"{e['cumulative_flops']:.4g}",
             f"{100 * e['cumulative_flops'] / tf:.1f}%"] for e in results["ensemble"]]
    lines += [markdown_table(["m", "student width", "ensemble acc.", "student m alone", "cumulative FLOPs",
                              "% of teacher FLOPs"], rows), ""]
    ensembles = results.get("ensembles") or {}
    if len(ensembles) > 1:
        rules = list(ensembles)
        lines += ["The ensemble rules at each number of students (same widths, seeds and training steps):", ""]
        rows = [[e["m"], f"{100 * e['cumulative_flops'] / tf:.1f}%"]
                + [f"{ensembles[r]['curve'][i]['accuracy']:.4f} (student alone {ensembles[r]['curve'][i]['student_accuracy']:.4f})"
                   for r in rules] for i, e in enumerate(results["ensemble"])]
        lines += [markdown_table(["m", "% of teacher FLOPs"] + [RULE_TEXT[r] for r in rules], rows), ""]
    by_budget = results.get("direct_by_budget") or []
    if len(by_budget) > 1:
        ta = teacher["stats"]["flops_analytic"]
        lines += ["A direct KD student at each prefix's cumulative FLOPs (analytic; width matched):", ""]
        rows = [[d["m"], d["d_model"], f"{100 * d['budget_analytic'] / ta:.1f}%", f"{100 * d['flops_analytic'] / ta:.1f}%",
                 f"{results['ensemble'][d['m'] - 1]['accuracy']:.4f}", f"{d['accuracy']:.4f}"] for d in by_budget]
        lines += [markdown_table(["m", "direct student width", "budget: m students' FLOPs", "direct student's FLOPs",
                                  f"ensemble of m ({results['ensemble_rule']})", "direct KD student"], rows), ""]
    lines += ["Models:", ""]

    ta = teacher["stats"]["flops_analytic"]

    def row(name, acc, s):
        return [name, f"{acc:.4f}", s["params"], f"{s['flops']:.4g}", f"{100 * s['flops'] / tf:.1f}%",
                f"{s['flops_analytic']:.4g}", f"{100 * s['flops_analytic'] / ta:.1f}%",
                f"{s['latency_ms_b1']:.3f}", f"{s['latency_ms_b256']:.2f}", _mb(s["memory_bytes_b256"])]

    k = len(results["ensemble"])
    rows = [row("teacher", teacher["accuracy"], teacher["stats"]),
            row(f"ensemble of {k} students", results["ensemble"][-1]["accuracy"], results["ensemble_stats"]),
            row(f"direct KD student (d={results['direct']['d_model']})", results["direct"]["accuracy"],
                results["direct"]["stats"]),
            row(f"labels-only student (d={results['labels']['d_model']})", results["labels"]["accuracy"],
                results["labels"]["stats"])]
    rows += [row(f"student {i + 1} (d={s['d_model']})", s["accuracy"], s["stats"])
             for i, s in enumerate(results["students"])]
    lines += [markdown_table(["model", "accuracy", "params", "FLOPs/example (XLA)", "% teacher (XLA)",
                              "FLOPs/example (analytic: matmuls + scan)", "% teacher (analytic)",
                              "CPU latency b=1 (ms)", "CPU latency b=256 (ms)", "memory b=256 (MiB)"], rows), ""]
    goal = results["goal"]
    lines += [f"Goal (issue 9): ensemble within 0.5 % of the teacher at ≤ 63 % of its FLOPs — ensemble "
              f"{goal['ensemble_accuracy']:.4f} vs teacher {goal['teacher_accuracy']:.4f} at "
              f"{100 * goal['flops_fraction']:.1f}% FLOPs: **{'met' if goal['within_half_percent_at_63'] else 'not met'}**; "
              f"ensemble beats the direct student of equal FLOPs: **{'yes' if goal['beats_direct'] else 'no'}**.", ""]
    lines += ["The paper's numbers (Medina et al., arXiv 2503.01727) — **on MNIST**, not on this data set:", ""]
    lines += [markdown_table(["model (paper, MNIST)", "accuracy", "% of teacher FLOPs"],
                             [[p["model"], p["accuracy"], f"{100 * p['flops_fraction']:.0f}%"] for p in PAPER_MNIST]), ""]
    baselines = results.get("baselines") or []
    if baselines:
        lines += ["Our teacher beside published Fashion-MNIST test accuracies (the benchmark table of the "
                  "`dataset-fashion-mnist` package's README; its benchmark/baselines.json holds only the "
                  "scikit-learn hyper-parameter grids):", ""]
        rows = [[f"**our Mamba teacher** ({teacher['stats']['params']} params)", f"{teacher['accuracy']:.4f}", "none"]]
        short = lambda text: text if len(text) <= 48 else text[:45] + "..."
        rows += [[b["classifier"], b["fashion_accuracy"], short(b["preprocessing"])] for b in baselines]
        lines += [markdown_table(["classifier", "Fashion-MNIST test accuracy", "preprocessing"], rows), ""]
    lines += [results["hardware"], ""]
    return "\n".join(lines)


def across_seeds(by_seed: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The seeds' results (each `run_seed`'s dict, same config but the seed) as accuracy lists per point,
    with x = analytic FLOPs as a fraction of the teacher's (`classifier_flops`; the same in every seed):
    {seeds, dataset, preset, teacher: {accuracy: [..]}, ensembles: {rule: [{m, d_model, flops_fraction,
    accuracy: [..], student_accuracy: [..]}]}, direct_by_budget: [{m, d_model, flops_fraction, accuracy}],
    labels: {d_model, flops_fraction, accuracy}}; every accuracy list in seed order."""
    first = by_seed[0]
    tf = first["teacher"]["stats"]["flops_analytic"]
    acc = lambda get: [get(r) for r in by_seed]
    ensembles = {}
    for rule, entry in first["ensembles"].items():
        ensembles[rule] = [dict(m=e["m"], d_model=e["d_model"], flops_fraction=e["cumulative_flops_analytic"] / tf,
                                accuracy=acc(lambda r, i=i: r["ensembles"][rule]["curve"][i]["accuracy"]),
                                student_accuracy=acc(lambda r, i=i: r["ensembles"][rule]["curve"][i]["student_accuracy"]))
                           for i, e in enumerate(entry["curve"])]
    direct = [dict(m=d["m"], d_model=d["d_model"], flops_fraction=d["flops_analytic"] / tf,
                   accuracy=acc(lambda r, i=i: r["direct_by_budget"][i]["accuracy"]))
              for i, d in enumerate(first["direct_by_budget"])]
    labels = dict(d_model=first["labels"]["d_model"], flops_fraction=first["labels"]["stats"]["flops_analytic"] / tf,
                  accuracy=acc(lambda r: r["labels"]["accuracy"]))
    return dict(seeds=[r["config"]["seed"] for r in by_seed], dataset=first["config"]["dataset"],
                preset=first["config"]["preset"], teacher=dict(accuracy=acc(lambda r: r["teacher"]["accuracy"])),
                ensembles=ensembles, direct_by_budget=direct, labels=labels)


def _spread(values: Sequence[float]) -> str:
    mean, sd = mean_and_sd(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {sd:.4f}"


def seeds_markdown(summary: Dict[str, Any]) -> str:
    """The anytime curves of `across_seeds` as one table: per number of students m, the % of the teacher's
    analytic FLOPs, each ensemble rule's accuracy and the direct KD student of that budget (mean ± sample sd
    over the seeds), then the teacher, the labels-only student and the paper's MNIST points."""
    seeds = summary["seeds"]
    rules = list(summary["ensembles"])
    direct = {d["m"]: d for d in summary["direct_by_budget"]}
    lines = [f"### PKD on `{summary['dataset']}`, preset `{summary['preset']}`, seeds {', '.join(map(str, seeds))}",
             "", f"Test accuracy, mean ± sample sd over {len(seeds)} seeds (each seed: its own teacher, students and "
                 f"batches). FLOPs: analytic (matmul multiply-adds and the scan, `classifier_flops`), % of the "
                 f"teacher's.", ""]
    rows = []
    for i, e in enumerate(summary["ensembles"][rules[0]]):
        d = direct.get(e["m"])
        rows.append([e["m"], e["d_model"], f"{100 * e['flops_fraction']:.1f}%"]
                    + [_spread(summary["ensembles"][r][i]["accuracy"]) for r in rules]
                    + [_spread(e["student_accuracy"]),
                       "—" if d is None else f"{_spread(d['accuracy'])} (d={d['d_model']}, "
                                             f"{100 * d['flops_fraction']:.1f}%)"])
    lines += [markdown_table(["m", "student m width", "cumulative % of teacher FLOPs"]
                             + [f"ensemble: {RULE_TEXT[r]}" for r in rules]
                             + [f"student m alone ({rules[0]})", "direct KD student of that budget"], rows), ""]
    labels = summary["labels"]
    lines += [f"Teacher: {_spread(summary['teacher']['accuracy'])} (100 %). Labels-only student at the whole "
              f"ensemble's FLOPs (d={labels['d_model']}, {100 * labels['flops_fraction']:.1f}%): "
              f"{_spread(labels['accuracy'])}.", ""]
    lines += ["The paper's numbers (Medina et al., arXiv 2503.01727), **on MNIST**:", "",
              markdown_table(["model (paper, MNIST)", "accuracy", "% of teacher FLOPs"],
                             [[p["model"], p["accuracy"], f"{100 * p['flops_fraction']:.0f}%"] for p in PAPER_MNIST]),
              ""]
    return "\n".join(lines)


def plot_accuracy_vs_flops(summary: Dict[str, Any], path: str) -> None:
    """Accuracy against % of the teacher's analytic FLOPs (log x), from `across_seeds` (one seed or more:
    mean, with the sample sd as error bars): each ensemble rule after m students, the direct KD student at
    each budget, each student alone, the labels-only student, the teacher, and the paper's MNIST points
    (hollow, labelled as the paper's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def curve(points, fmt, label, **style):
        stats = [mean_and_sd(p["accuracy"]) for p in points]
        ax.errorbar([100 * p["flops_fraction"] for p in points], [m for m, _ in stats], yerr=[s for _, s in stats],
                    fmt=fmt, capsize=2, label=label, **style)

    for rule, points in summary["ensembles"].items():
        curve(points, "o-", f"ensemble, {RULE_TEXT[rule]} (after m students)", lw=2)
    main = next(iter(summary["ensembles"].values()))
    for e in main:
        ax.annotate(str(e["m"]), (100 * e["flops_fraction"], mean_and_sd(e["accuracy"])[0]), textcoords="offset points",
                    xytext=(3, -10), fontsize=7)
    alone = [dict(flops_fraction=e["flops_fraction"] - (main[i - 1]["flops_fraction"] if i else 0.0),
                  accuracy=e["student_accuracy"]) for i, e in enumerate(main)]
    curve(alone, ".", "each student alone", color="grey", ms=6)
    if len(summary["direct_by_budget"]) > 1:
        curve(summary["direct_by_budget"], "s--", "single student of that budget, KD from teacher")
    else:
        curve(summary["direct_by_budget"], "s", "single student, KD from teacher (ensemble's FLOPs)", ms=7)
    curve([summary["labels"]], "^", "single student, labels only (ensemble's FLOPs)", ms=7)
    curve([dict(flops_fraction=1.0, accuracy=summary["teacher"]["accuracy"])], "*", "teacher", color="black", ms=12)
    ax.plot([100 * p["flops_fraction"] for p in PAPER_MNIST], [p["accuracy"] for p in PAPER_MNIST], "D",
            mfc="none", color="tab:red", label="paper's numbers, MNIST (Medina et al.)")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per example, % of the teacher's (analytic: matmuls + scan)")
    ax.set_ylabel("test accuracy")
    seeds = summary["seeds"]
    ax.set_title(f"PKD on {summary['dataset']} (preset {summary['preset']}"
                 + (f", mean ± sd of {len(seeds)} seeds)" if len(seeds) > 1 else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pick_baselines() -> List[Dict[str, Any]]:
    """A few rows of the published table (`BASELINE_ROWS`), in that order, when the package ships it."""
    submitted = fashion_mnist_baselines()["submitted"]
    picked = []
    for name in BASELINE_ROWS:
        for row in submitted:
            if row["classifier"].startswith(name) and row not in picked:
                picked.append(row)
                break
    return picked


# -------------------------------------------------------------------------------------------------- main


def save_model(out: str, name: str, model_config: ClassifierConfig, params) -> None:
    os.makedirs(os.path.join(out, "models"), exist_ok=True)
    with open(os.path.join(out, "models", f"{name}.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))
    with open(os.path.join(out, "models", f"{name}.json"), "w") as f:
        json.dump(model_config.to_dict(), f, indent=1)


def train_ensemble(rule: str, config: PKDConfig, train, test, teacher_logits: np.ndarray, out: str, *, pbar=None,
                   records: Optional[List[dict]] = None):
    """Train the K students of one ensemble `rule` (ENSEMBLE_RULES) one after another.

    "additive": student m trains on the sum of its logits and the frozen logits of students 1..m−1
    (precomputed on the training set, like the teacher's), uniform weights; the ensemble predicts with the
    sum. "mean_softmax": student m trains alone with boosting weights from the ensemble of students
    1..m−1 (uniform for the first); the ensemble predicts with the mean of the softmaxes.
    Students are saved as models/<rule>_student_<m>. Returns (students: [{d_model, params, config,
    accuracy}], curve: [{m, d_model, accuracy, student_accuracy, cumulative_flops (XLA),
    cumulative_flops_analytic, train_accuracy}] (the
    ensemble after m students), boosting: [{before_student, max_weight, effective_fraction,
    mean_ensemble_loss}]).
    """
    test_images, test_labels = test
    ebs = config.eval_batch_size
    students, curve, boosting = [], [], []
    train_logits, test_logits = [], []
    weights, cumulative, cumulative_analytic = None, 0.0, 0
    K = len(config.student_widths())
    for m, (cfg, width) in enumerate(zip(config.student_configs(), config.student_widths())):
        name = f"{rule}_student_{m + 1}"
        base = sum(train_logits) if rule == "additive" and train_logits else None
        params = train_model(name, cfg, config, train, steps=config.student_steps, seed=config.seed + 1 + m,
                             teacher_logits=teacher_logits, weights=weights, base_logits=base, pbar=pbar,
                             records=records)
        save_model(out, name, cfg, params)
        train_logits.append(predict_probs(cfg, params, train[0], ebs, logits=True))
        test_logits.append(predict_probs(cfg, params, test_images, ebs, logits=True))
        cumulative += flops_per_example((cfg,))
        cumulative_analytic += classifier_flops(cfg)
        student_acc = accuracy(test_logits[-1], test_labels)
        students.append(dict(d_model=width, params=params, config=cfg, accuracy=student_acc))
        ens_train = np.asarray(ensemble_prediction(rule, train_logits))
        curve.append(dict(m=m + 1, d_model=width, accuracy=accuracy(np.asarray(ensemble_prediction(rule, test_logits)),
                                                                   test_labels),
                          student_accuracy=student_acc, cumulative_flops=cumulative,
                          cumulative_flops_analytic=cumulative_analytic,
                          train_accuracy=accuracy(ens_train, train[1])))
        if rule == "mean_softmax" and m + 1 < K:  # weights for the next student, from students 1..m
            p_true = ens_train[np.arange(len(train[1])), train[1]]
            losses = -np.log(np.maximum(p_true, 1e-12))
            weights = boosting_weights(losses, config.boost_beta, config.boost_max_weight)
            boosting.append(dict(before_student=m + 2, max_weight=float(weights.max()),
                                 effective_fraction=float(weights.sum() ** 2 / (weights ** 2).sum() / len(weights)),
                                 mean_ensemble_loss=float(losses.mean())))
    return students, curve, boosting


def run_seed(config: PKDConfig, out: str) -> Dict[str, Any]:
    """Run the experiment for `config.seed`, write every output under `out`, return the results dict."""
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    train = load_images(config.dataset, "train")
    test_images, test_labels = load_images(config.dataset, "test")
    if config.max_eval_examples:
        test_images, test_labels = test_images[:config.max_eval_examples], test_labels[:config.max_eval_examples]
    records: List[dict] = []
    widths = config.student_widths()
    K = len(widths)
    singles = (K if config.direct_per_budget else 1) + 1
    total = config.teacher_steps + len(config.ensemble_rules()) * K * config.student_steps + singles * config.single_steps
    pbar = tqdm(total=total, desc="pkd", disable=not config.progress, dynamic_ncols=True)
    ebs = config.eval_batch_size

    # 1. teacher
    t_cfg = config.teacher_config()
    t_params = train_model("teacher", t_cfg, config, train, steps=config.teacher_steps, seed=config.seed,
                           pbar=pbar, records=records)
    t_test = predict_probs(t_cfg, t_params, test_images, ebs)
    teacher_logits = predict_probs(t_cfg, t_params, train[0], ebs, logits=True)  # stored: (n_train, V)
    save_model(out, "teacher", t_cfg, t_params)

    # 2. progressive ensembles, one per rule (the same student widths and seeds)
    ensembles = {rule: train_ensemble(rule, config, train, (test_images, test_labels), teacher_logits, out,
                                      pbar=pbar, records=records) for rule in config.ensemble_rules()}
    main_rule = config.ensemble_rules()[0]
    students, ensemble, boosting = ensembles[main_rule]

    # 3. single students of the ensemble's FLOPs (analytic): "direct" (KD) and "labels"; with
    # `direct_per_budget`, a direct KD student at every prefix m's cumulative FLOPs (the last is "direct")
    budgets = [e["cumulative_flops_analytic"] for e in ensemble]
    direct_by_budget = []
    for m, budget in enumerate(budgets, start=1):
        if m < len(budgets) and not config.direct_per_budget:
            continue
        width = match_flops_width(config, budget)
        cfg = config.single_config(width)
        params = train_model(f"direct_budget_{m}", cfg, config, train, steps=config.single_steps,
                             seed=config.seed + 100, teacher_logits=teacher_logits, pbar=pbar, records=records)
        save_model(out, f"direct_budget_{m}", cfg, params)
        direct_by_budget.append(dict(m=m, d_model=width, params=params, config=cfg,
                                     flops_analytic=classifier_flops(cfg), budget_analytic=budget,
                                     accuracy=accuracy(predict_probs(cfg, params, test_images, ebs), test_labels)))
    single_width, single_cfg = direct_by_budget[-1]["d_model"], direct_by_budget[-1]["config"]
    arms = {"direct": {k: direct_by_budget[-1][k] for k in ("d_model", "params", "accuracy")}}
    params = train_model("labels", single_cfg, config, train, steps=config.single_steps, seed=config.seed + 100,
                         pbar=pbar, records=records)
    save_model(out, "single_labels", single_cfg, params)
    arms["labels"] = dict(d_model=single_width, params=params,
                          accuracy=accuracy(predict_probs(single_cfg, params, test_images, ebs), test_labels))
    pbar.close()

    # 4. measurements
    reps = config.latency_repeats
    t_stats = measure((t_cfg,), (t_params,), reps)
    for s in students:
        s["stats"] = measure((s["config"],), (s["params"],), reps)
    ens_stats = measure(tuple(s["config"] for s in students), tuple(s["params"] for s in students), reps,
                        main_rule)
    single_stats = measure((single_cfg,), (arms["direct"]["params"],), reps)
    for key in arms:
        arms[key]["stats"] = single_stats  # same architecture
    teacher_acc = accuracy(t_test, test_labels)
    final = ensemble[-1]
    goal = dict(teacher_accuracy=teacher_acc, ensemble_accuracy=final["accuracy"],
                flops_fraction=final["cumulative_flops"] / t_stats["flops"],
                within_half_percent_at_63=bool(final["accuracy"] >= teacher_acc - 0.005
                                               and final["cumulative_flops"] <= 0.63 * t_stats["flops"]),
                beats_direct=bool(final["accuracy"] > arms["direct"]["accuracy"]))
    results = dict(
        config=dataclasses.asdict(config),
        data=dict(dataset=config.dataset, n_train=int(len(train[1])), n_test=int(len(test_labels))),
        teacher=dict(d_model=config.teacher_d_model, accuracy=teacher_acc, stats=t_stats),
        students=[dict(d_model=s["d_model"], accuracy=s["accuracy"], stats=s["stats"]) for s in students],
        ensemble=ensemble, ensemble_stats=ens_stats, boosting=boosting, ensemble_rule=main_rule,
        ensembles={rule: dict(curve=curve, boosting=b, students=[dict(d_model=s["d_model"], accuracy=s["accuracy"])
                                                                 for s in st])
                   for rule, (st, curve, b) in ensembles.items()},
        direct={k: v for k, v in arms["direct"].items() if k != "params"},
        direct_by_budget=[{k: v for k, v in d.items() if k not in ("params", "config")} for d in direct_by_budget],
        labels={k: v for k, v in arms["labels"].items() if k != "params"},
        goal=goal, paper_mnist=PAPER_MNIST,
        baselines=pick_baselines() if config.dataset == "fashion_mnist" else [],
        hardware=hardware_description())
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_accuracy_vs_flops(across_seeds([results]), os.path.join(out, "accuracy_vs_flops.png"))
    print(table)
    print(f"wrote {out}/results.md, results.json, accuracy_vs_flops.png")
    return results


def run(config: PKDConfig, out: str) -> Dict[str, Any]:
    """Run the experiment: one seed writes its outputs in `out` and returns its results; several (`seeds`)
    run one after another into out/seed_<s> and `out` gets the summary over seeds (`across_seeds`):
    results.json (with each seed's results), results.md and accuracy_vs_flops.png."""
    if config.seeds == 1:
        return run_seed(config, out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    by_seed = [run_seed(dataclasses.replace(config, seed=config.seed + i, seeds=1),
                        os.path.join(out, f"seed_{config.seed + i}")) for i in range(config.seeds)]
    summary = across_seeds(by_seed)
    results = dict(config=dataclasses.asdict(config), summary=summary, by_seed=by_seed, hardware=hardware_description())
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = seeds_markdown(summary) + "\n" + results["hardware"] + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_accuracy_vs_flops(summary, os.path.join(out, "accuracy_vs_flops.png"))
    print(table)
    print(f"wrote {out}/results.md, results.json, accuracy_vs_flops.png (each seed's in {out}/seed_<s>)")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, out = parse_command_line([] if argv is None else argv)
    run(config, out)
    return 0
