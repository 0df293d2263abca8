"""`mamba-jax run lm`: train a Mamba LM on selective copying or MQAR and report answer accuracy.

    mamba-jax run lm [--preset smoke|cpu|paper] [--task selective_copy|mqar] [--out DIR] [--resume]
                     [--stop-after STEP] [key=value ...]

Writes into ``results/lm/<timestamp>/`` (or ``--out``): config.json, metrics.jsonl, tensorboard/,
checkpoints/, results.json, results.md and training.png. ``--resume`` continues the run in ``--out``
(default: the newest run under results/lm) from its latest complete checkpoint, exactly as if it had not
stopped: metrics.jsonl records of steps after that checkpoint (logged by the interrupted run, which may
have been killed at any point, even mid-save) are dropped and the TensorBoard events of those steps are
purged, so the resumed run's files equal an uninterrupted run's (timing fields aside).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments.lm.config import (
    PRESETS,
    TASKS,
    LMConfig,
    apply_overrides,
    config_from_dict,
    parse_overrides,
    preset_config,
)

RESULTS_ROOT = os.path.join("results", "lm")

# Published numbers to put beside ours (None: no number in a table to compare with).
PAPER_REFERENCE: Dict[str, Optional[Dict[str, Any]]] = {
    "selective_copy": {
        "accuracy": 0.998,
        "source": "Gu & Dao 2023, 'Mamba' (arXiv 2312.00752), Table 1: Mamba architecture with the S6 layer",
        "setting": "2-layer models; noise region of 4096 tokens, 16 data tokens, vocabulary 16 "
                   "(App. E.1); the answer is read at marker tokens, not teacher-forced",
    },
    "mqar": None,
}


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba-jax run lm", description=__doc__.splitlines()[0],
        usage="mamba-jax run lm [--preset smoke|cpu|paper] [--task selective_copy|mqar] [--out DIR] [--resume] "
              "[--stop-after STEP] [key=value ...]",
        epilog="key=value (or --config.key=value) overrides any LMConfig field, e.g. num_steps=200 d_model=32")
    parser.add_argument("--preset", choices=PRESETS, default=None, help="default: cpu")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: selective_copy")
    parser.add_argument("--out", default=None, help="run directory (default: results/lm/<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (or the newest run)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and exit after STEP steps (finish later with --resume)")
    return parser


def parse_command_line(argv: Sequence[str]) -> Tuple[argparse.Namespace, LMConfig, str]:
    """(args, resolved config, run directory); a bad flag, key or value exits with a usage error (2)."""
    parser = _make_parser()
    args, rest = parser.parse_known_args(list(argv))
    unknown_flags = [item for item in rest if item.startswith("-") and not item.startswith("--config.")]
    if unknown_flags:
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags)}")
    try:
        config, out = resolve_config(args, parse_overrides(rest))
        config.loop_config(stop_after=args.stop_after)
    except ValueError as error:
        parser.error(str(error))
    return args, config, out


def newest_run_dir(root: str = RESULTS_ROOT) -> str:
    """The newest run directory (timestamp names sort by time) under `root`."""
    runs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    if not runs:
        raise ValueError(f"--resume: no run under {root!r} to resume; pass --out DIR")
    return os.path.join(root, runs[-1])


def new_run_dir(root: str = RESULTS_ROOT) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = os.path.join(root, stamp), 1
    while os.path.exists(path):
        path, i = os.path.join(root, f"{stamp}-{i}"), i + 1
    return path


def resolve_config(args: argparse.Namespace, overrides: Dict[str, str]) -> Tuple[LMConfig, str]:
    """(config, run directory) from the command line; on --resume the run's config.json is the base."""
    if args.resume:
        out = args.out or newest_run_dir()
        config_path = os.path.join(out, "config.json")
        if not os.path.exists(config_path):
            raise ValueError(f"--resume: {config_path} does not exist")
        with open(config_path) as f:
            saved = config_from_dict(json.load(f))
        for flag, value in (("preset", args.preset), ("task", args.task)):
            if value is not None and value != getattr(saved, flag):
                raise ValueError(f"--resume: --{flag} {value} differs from the run's {flag} "
                                 f"{getattr(saved, flag)!r}; drop --{flag} or start a new run")
        return apply_overrides(saved, overrides), out
    config = apply_overrides(preset_config(args.preset or "cpu", args.task or "selective_copy"), overrides)
    out = args.out or new_run_dir()
    if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise ValueError(f"--out {out} already holds checkpoints; pass --resume to continue it or choose "
                         f"another --out")
    return config, out


def plot_history(records: List[Dict[str, Any]], path: str, *, chance: float, title: str) -> None:
    """Save a PNG: training loss (left) and eval answer accuracy (right) against the step.

    Uses a bare `matplotlib.figure.Figure` (Agg canvas), so no pyplot state or backend is touched.
    """
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (answer tokens)")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval accuracy")
    ax_acc.plot([r["step"] for r in evals], [r["eval_exact_match"] for r in evals], "s--",
                label="eval exact match (all answers)")
    ax_acc.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.3f})")
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="answer accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def task_description(config: LMConfig) -> str:
    if config.task == "selective_copy":
        return (f"selective copying: {config.n_tokens_to_copy} of {config.n_data_tokens} data tokens in a noise "
                f"region of {config.seq_len - config.n_tokens_to_copy}, seq_len {config.seq_len}, teacher-forced")
    return (f"MQAR: {config.num_kv_pairs} kv pairs, vocab {config.mqar_vocab_size}, seq_len {config.seq_len}, "
            f"power_a {config.mqar_power_a}")


def results_markdown(results: Dict[str, Any]) -> str:
    """The results table (ours beside the published number, where one exists) as markdown."""
    cfg, final, paper = results["config"], results["final"], results["paper"]
    lines = [
        f"# lm: {cfg['task']} ({cfg['preset']} preset)",
        "",
        f"Task: {results['task_description']}. Model: Mamba-1, n_layer {cfg['n_layer']}, d_model "
        f"{cfg['d_model']}, d_state {cfg['d_state']} ({results['num_params']:,} parameters). "
        f"{cfg['num_steps']} steps × batch {cfg['batch_size']}. Evaluated on {results['eval_sequences']} held-out "
        f"sequences ({int(final['eval_tokens'])} answer tokens). Run: {results['wall_time_s']:.0f} s on "
        f"{results['device']}, {results['date']}.",
        "",
        "| model | setting | answer-token accuracy | exact match (all answers) | chance |",
        "|---|---|---|---|---|",
        f"| Mamba (ours) | {cfg['preset']} preset, above | {100 * final['eval_accuracy']:.1f}% | "
        f"{100 * final['eval_exact_match']:.1f}% | {100 * results['chance_accuracy']:.1f}% |",
    ]
    if paper is not None:
        lines.append(f"| Mamba (published) | {paper['setting']} | {100 * paper['accuracy']:.1f}% | — | — |")
        lines += ["", f"Published number: {paper['source']}. Our setting differs (shorter sequences, a smaller "
                      f"vocabulary/fewer tokens, far fewer steps, teacher-forced answers), so the two are context, "
                      f"not a like-for-like comparison."]
    else:
        lines += ["", "No published table number for this setting: Zoology (Arora et al. 2023, arXiv 2312.04927) "
                      "reports MQAR accuracy in figures only."]
    return "\n".join(lines) + "\n"


def build_train_state(config: LMConfig):
    """(model, freshly initialised TrainState) of `config`: float32 params and optimizer state; the model
    computes in `config.compute_dtype`."""
    import jax

    from mamba_jax.models import MambaLM, init_params
    from mamba_jax.train import create_train_state, make_optimizer

    model = MambaLM(config.model_config())
    params = init_params(model, jax.random.PRNGKey(config.seed), seq_len=config.seq_len)
    return model, create_train_state(model.apply, params, make_optimizer(config.optimizer_config()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config, out = parse_command_line(argv)
    t_start = time.perf_counter()

    import jax
    import numpy as np

    from mamba_jax.data import get_batch, make_dataset
    from mamba_jax.train import (
        Checkpointer,
        MetricsWriter,
        evaluate,
        learning_rate_schedule,
        make_eval_step,
        make_train_step,
        read_jsonl,
        train_loop,
    )

    loop_config = config.loop_config(stop_after=args.stop_after)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)

    task = config.make_task()
    model, state = build_train_state(config)
    train_data = make_dataset(task, seed=config.seed, batch_size=config.batch_size, num_batches=config.num_steps)
    eval_batches = list(make_dataset(task, seed=config.seed, batch_size=config.batch_size,
                                     num_batches=config.eval_batches, split="eval"))
    eval_step = make_eval_step(model.apply)

    checkpointer = Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=config.max_checkpoints_to_keep)
    start_step = None
    if args.resume and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        start_step = int(meta["step"])
        print(f"resumed {out} at step {start_step}", file=sys.stderr)
    # on resume: drop records (and purge TensorBoard events) of steps after the restored checkpoint
    metrics = MetricsWriter(os.path.join(out, "metrics.jsonl"), keep_until_step=start_step,
                            tensorboard_dir=os.path.join(out, "tensorboard") if config.tensorboard else None)
    print(f"lm: {task_description(config)}; writing {out}", file=sys.stderr)

    train_step = make_train_step(learning_rate_schedule(config.optimizer_config()),
                                 grad_accum_steps=config.grad_accum_steps)
    state, history = train_loop(
        state, train_step, lambda i: get_batch(train_data, i),
        loop_config, evaluate_fn=lambda s: evaluate(eval_step, s.params, eval_batches), metrics=metrics,
        checkpointer=checkpointer, checkpoint_meta=lambda step: {"step": step, "config": config.to_dict()})
    checkpointer.close()
    metrics.close()
    done = int(jax.device_get(state.step))
    if done < config.num_steps:
        print(f"stopped after step {done} of {config.num_steps}; continue with: mamba-jax run lm --resume "
              f"--out {out}", file=sys.stderr)
        return 0

    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    final_evals = [r for r in records if r["kind"] == "eval" and r["step"] == config.num_steps]
    final = final_evals[-1] if final_evals else {"step": done, **evaluate(eval_step, state.params, eval_batches)}
    final = {k: v for k, v in final.items() if k.startswith("eval_")}
    train_records = [r for r in records if r["kind"] == "train"]
    results = {
        "experiment": "lm",
        "task": config.task,
        "preset": config.preset,
        "task_description": task_description(config),
        "steps": done,
        "final": final,
        "final_train_loss": train_records[-1]["loss"] if train_records else None,
        "chance_accuracy": task.chance_accuracy,
        "eval_sequences": config.eval_batches * config.batch_size,
        "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))),
        "wall_time_s": time.perf_counter() - t_start,
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {os.cpu_count()} host cores)",
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "paper": PAPER_REFERENCE[config.task],
        "config": config.to_dict(),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = results_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_history(records, os.path.join(out, "training.png"), chance=task.chance_accuracy,
                 title=f"Mamba on {config.task} ({config.preset} preset)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
