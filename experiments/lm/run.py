"""`mamba-jax run lm`: train a Mamba LM on selective copying or MQAR (answer accuracy) or on real text (bits per byte).

    mamba-jax run lm [--preset smoke|cpu|paper] [--task selective_copy|mqar|text] [--out DIR] [--resume]
                     [--stop-after STEP] [key=value ...]

``--task text`` (the default) trains on the Python standard library's sources (`mamba_jax.data.text`): files split into
train/held-out by a stable hash of their path, tokenized (bytes, or a BPE trained on the train files and
saved as <run>/tokenizer.json), packed into rows of `seq_len` with `seq_idx` so that the model's scan
restarts at every document; evaluation reports the held-out loss in bits per byte beside a unigram baseline.

Writes into ``results/lm/<timestamp>/`` (or ``--out``): config.json, metrics.jsonl, tensorboard/,
checkpoints/ (with the grain iterator's state for `text`), results.json, results.md and training.png. ``--resume`` continues the run in ``--out``
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
    DEFAULT_TASK,
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
    "text": None,
}


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba-jax run lm", description=__doc__.splitlines()[0],
        usage="mamba-jax run lm [--preset smoke|cpu|paper] [--task selective_copy|mqar|text] [--out DIR] [--resume] "
              "[--stop-after STEP] [key=value ...]",
        epilog="key=value (or --config.key=value) overrides any LMConfig field, e.g. num_steps=200 d_model=32")
    parser.add_argument("--preset", choices=PRESETS, default=None, help="default: cpu")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: text")
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
    config = apply_overrides(preset_config(args.preset or "cpu", args.task or DEFAULT_TASK), overrides)
    out = args.out or new_run_dir()
    if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise ValueError(f"--out {out} already holds checkpoints; pass --resume to continue it or choose "
                         f"another --out")
    return config, out


def plot_history(records: List[Dict[str, Any]], path: str, *, title: str, chance: Optional[float] = None,
                 baseline_bpb: Optional[float] = None) -> None:
    """Save a PNG: training loss (left) and, right, eval answer accuracy against `chance` (synthetic
    tasks) or, when the eval records hold ``eval_bits_per_byte`` (text), held-out bits per byte against
    the unigram `baseline_bpb`.

    Uses a bare `matplotlib.figure.Figure` (Agg canvas), so no pyplot state or backend is touched.
    """
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    text = any("eval_bits_per_byte" in r for r in evals)
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_right = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train],
                 label="train loss (all tokens)" if text else "train loss (answer tokens)")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                     label="held-out loss" if text else "eval loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="loss")
    ax_loss.legend()
    if text:
        ax_right.plot([r["step"] for r in evals], [r["eval_bits_per_byte"] for r in evals], "o-",
                      label="Mamba, held-out files")
        if baseline_bpb is not None:
            ax_right.axhline(baseline_bpb, color="grey", linestyle=":", label=f"unigram baseline ({baseline_bpb:.3f})")
        top = max([r["eval_bits_per_byte"] for r in evals] + [baseline_bpb or 0.0])
        ax_right.set(xlabel="step", ylabel="bits per byte", ylim=(0, 1.15 * top), title="held-out bits per byte")
    else:
        ax_right.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval accuracy")
        ax_right.plot([r["step"] for r in evals], [r["eval_exact_match"] for r in evals], "s--",
                      label="eval exact match (all answers)")
        if chance is not None:
            ax_right.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.3f})")
        ax_right.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="answer accuracy")
    ax_right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def task_description(config: LMConfig) -> str:
    if config.task == "text":
        files = f"the first {config.text_max_files} " if config.text_max_files else ""
        root = config.text_root or "the Python standard library"
        return (f"text: {files}{config.text_pattern} files of {root}, {config.tokenizer} tokenizer, packed into "
                f"rows of {config.seq_len} with seq_idx (the scan restarts at each document), "
                f"{config.text_eval_fraction:.0%} of the files held out")
    if config.task == "selective_copy":
        answers = "teacher-forced" if config.copy_teacher_forced else "answers read at markers (not teacher-forced)"
        return (f"selective copying: {config.n_tokens_to_copy} of {config.n_data_tokens} data tokens in a noise "
                f"region of {config.seq_len - config.n_tokens_to_copy}, seq_len {config.seq_len}, {answers}")
    return (f"MQAR: {config.num_kv_pairs} kv pairs, vocab {config.mqar_vocab_size}, seq_len {config.seq_len}, "
            f"power_a {config.mqar_power_a}")


def model_description(config: LMConfig) -> str:
    """The model's name in tables and titles: Mamba-1 (S6), its LTI ablation, or the Transformer."""
    if config.architecture == "transformer":
        return f"Transformer (Llama-style, rotary, {config.n_heads} heads)"
    return "Mamba-1" + ("" if config.selective else " with the LTI layer (Δ, B, C input-independent)")


def results_markdown(results: Dict[str, Any]) -> str:
    """The results table (ours beside the published number, where one exists) as markdown."""
    cfg, final, paper = results["config"], results["final"], results["paper"]
    model = model_description(config_from_dict(cfg))
    lines = [
        f"# lm: {cfg['task']} ({cfg['preset']} preset)",
        "",
        f"Task: {results['task_description']}. Model: {model}, n_layer {cfg['n_layer']}, d_model "
        f"{cfg['d_model']}" + (f", d_state {cfg['d_state']}" if cfg["architecture"] == "mamba" else "")
        + f" ({results['num_params']:,} parameters). "
        f"{cfg['num_steps']} steps × batch {cfg['batch_size']}. Evaluated on {results['eval_sequences']} held-out "
        f"sequences ({int(final['eval_tokens'])} answer tokens). Run: {results['wall_time_s']:.0f} s on "
        f"{results['device']}, {results['date']}.",
        "",
        "| model | setting | answer-token accuracy | exact match (all answers) | chance |",
        "|---|---|---|---|---|",
        f"| {model} (ours) | {cfg['preset']} preset, above | {100 * final['eval_accuracy']:.1f}% | "
        f"{100 * final['eval_exact_match']:.1f}% | {100 * results['chance_accuracy']:.1f}% |",
    ]
    if paper is not None:
        lines.append(f"| Mamba (published) | {paper['setting']} | {100 * paper['accuracy']:.1f}% | — | — |")
        forced = ", teacher-forced answers" if cfg.get("copy_teacher_forced", True) else ""
        lines += ["", f"Published number: {paper['source']}. Our setting differs (shorter sequences, a smaller "
                      f"vocabulary/fewer tokens, far fewer steps{forced}), so the two are context, not a "
                      f"like-for-like comparison."]
    else:
        lines += ["", "No published table number for this setting: Zoology (Arora et al. 2023, arXiv 2312.04927) "
                      "reports MQAR accuracy in figures only."]
    return "\n".join(lines) + "\n"


def text_results_markdown(results: Dict[str, Any]) -> str:
    """The `text` results table (ours beside the unigram and uniform baselines) as markdown."""
    cfg, final, data, base = results["config"], results["final"], results["data"], results["baseline"]
    lines = [
        f"# lm: text ({cfg['preset']} preset)",
        "",
        f"Task: {results['task_description']}. Model: Mamba-1, n_layer {cfg['n_layer']}, d_model {cfg['d_model']}, "
        f"d_state {cfg['d_state']} ({results['num_params']:,} parameters). {cfg['num_steps']} steps × batch "
        f"{cfg['batch_size']} × {cfg['seq_len']} tokens. Train: {data['train_files']} files, "
        f"{data['train_tokens']:,} tokens. Held out: {data['eval_files']} files; evaluated on the first "
        f"{data['eval_rows']} of their {data['eval_rows_total']} rows ({int(final['eval_tokens']):,} tokens, "
        f"{data['eval_bytes']:,} bytes). Run: {results['wall_time_s']:.0f} s on {results['device']}, "
        f"{results['date']}.",
        "",
        "| model | held-out bits per byte | loss (nats/token) | perplexity (per token) | next-token accuracy |",
        "|---|---|---|---|---|",
        f"| Mamba (ours) | {final['eval_bits_per_byte']:.3f} | {final['eval_loss']:.4f} | "
        f"{final['eval_perplexity']:.3f} | {100 * final['eval_accuracy']:.1f}% |",
        f"| unigram (training token frequencies, add-one) | {base['unigram_bits_per_byte']:.3f} | "
        f"{base['unigram_loss']:.4f} | {base['unigram_perplexity']:.3f} | — |",
        "| uniform over 256 byte values | 8.000 | — | — | — |",
        "",
        f"Bits per byte = Σ cross-entropy (nats) over every held-out target token, the end-of-document token "
        f"included, / ln 2 / the UTF-8 bytes of those targets (EOS and BOS count 0 bytes). The unigram row "
        f"scores the same targets with the training split's token frequencies (add-one smoothed); the "
        f"training text's own unigram entropy is {base['train_unigram_entropy_bits_per_byte']:.3f} bits per "
        f"byte. No published number is put beside ours: this corpus and setting are this project's.",
    ]
    return "\n".join(lines) + "\n"


def token_byte_lengths(tokenizer) -> "np.ndarray":
    """(vocab,) int64: the UTF-8 bytes each token id stands for (specials: 0).

    Byte tokenizer: 1 for ids < 256. Byte-level BPE: the length of the token's byte-level string (one
    character per byte)."""
    import numpy as np

    from mamba_jax.data.text import ByteTokenizer

    lengths = np.zeros(tokenizer.vocab_size, np.int64)
    if isinstance(tokenizer, ByteTokenizer):
        lengths[:256] = 1
        return lengths
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    for i in range(tokenizer.vocab_size):
        if i not in specials:
            lengths[i] = len(tokenizer._tok.id_to_token(i))
    return lengths


def _step_batch(batch: Dict[str, Any]) -> Dict[str, Any]:
    """A `TextLMData` batch with the train step's key names (``input_ids`` -> ``inputs``)."""
    return {"inputs": batch["input_ids"], "targets": batch["targets"], "loss_mask": batch["loss_mask"],
            "seq_idx": batch["seq_idx"]}


class TextData:
    """The `text` task of a run: tokenizer, training batches, held-out batches and the baselines.

    * tokenizer: bytes, or a BPE trained on the train split's files (saved as <out>/tokenizer.json and
      loaded from there on --resume, so a resumed run uses the same ids), or the one passed (`tokenizer`).
    * ``iterator()``: the training batches as a grain iterator, whose state is checkpointed with the
      model; ``batch(i)``, the batch of training step i — `TextLMData.batch(i)` of the train split, a
      pure function of (seed, i) — is what the iterator yields at step i (tested).
    * ``eval_batches``: the first ``eval_batches × batch_size`` packed rows of the held-out files (all of
      them if fewer), in order, the last batch padded with masked-out rows.
    * ``add_bits_per_byte(metrics)``: eval_bits_per_byte and eval_perplexity from evaluate()'s metrics.
    """

    def __init__(self, config: LMConfig, out: str, *, resume: bool, tokenizer=None):
        import numpy as np

        from mamba_jax.data.text import (
            BPETokenizer,
            ByteTokenizer,
            TextLMData,
            packed_text_rows,
            read_documents,
            split_of,
            text_files,
            train_bpe_tokenizer,
        )

        root, frac = config.text_root_dir(), config.text_eval_fraction
        max_files = config.text_max_files or None
        paths = text_files(root, config.text_pattern, max_files)
        splits = [split_of(os.path.relpath(p, root), frac) for p in paths]
        self.train_files, self.eval_files = splits.count("train"), splits.count("eval")
        for name, count in (("train", self.train_files), ("eval", self.eval_files)):
            if count == 0:
                raise ValueError(f"text: no file of the {len(paths)} selected falls in the {name} split; raise "
                                 f"`text_max_files` or change `text_eval_fraction` ({frac})")
        if tokenizer is not None:   # a checkpoint's own (e.g. `HFTokenizer`)
            pass
        elif config.tokenizer == "byte":
            tokenizer = ByteTokenizer()
        else:
            path = os.path.join(out, "tokenizer.json")
            if resume and os.path.isfile(path):
                tokenizer = BPETokenizer.load(path)
            else:
                train_paths = [p for p, s in zip(paths, splits) if s == "train"]
                tokenizer = train_bpe_tokenizer(read_documents(train_paths), config.bpe_vocab_size, path=path)
        if tokenizer.vocab_size > config.vocab_size():
            raise ValueError(f"text: the tokenizer has {tokenizer.vocab_size} ids, more than the model's "
                             f"{config.vocab_size()}")
        self.tokenizer = tokenizer
        common = dict(seq_len=config.seq_len, tokenizer=tokenizer, max_files=max_files, eval_fraction=frac)
        self.train = TextLMData.from_files(root, config.text_pattern, batch_size=config.batch_size,
                                           seed=config.seed, split="train", **common)
        eval_rows = packed_text_rows(root, config.text_pattern, split="eval", **common)
        total = int(eval_rows["input_ids"].shape[0])
        n = min(total, config.eval_batches * config.batch_size)
        size = -(-n // config.batch_size) * config.batch_size
        pad = {"input_ids": tokenizer.pad_id, "targets": tokenizer.pad_id, "loss_mask": False, "seq_idx": 0}
        rows = {}
        for key, fill in pad.items():
            dtype = bool if key == "loss_mask" else np.int32
            arr = np.full((size, config.seq_len), fill, dtype)
            arr[:n] = eval_rows[key][:n]
            rows[key] = arr
        self.eval_batches = [_step_batch({k: v[i:i + config.batch_size] for k, v in rows.items()})
                             for i in range(0, size, config.batch_size)]
        self.eval_rows, self.eval_rows_total = n, total

        # bytes of the evaluated targets, and the unigram baseline on exactly those targets
        byte_len = token_byte_lengths(tokenizer)
        eval_targets = rows["targets"][rows["loss_mask"]]
        self.eval_bytes = int(byte_len[eval_targets].sum())
        train_targets = np.asarray(self.train.rows["targets"])[np.asarray(self.train.rows["loss_mask"], bool)]
        counts = np.bincount(train_targets.astype(np.int64), minlength=tokenizer.vocab_size).astype(np.float64)
        self.train_tokens = int(counts.sum())
        log_p = np.log((counts + 1.0) / (counts.sum() + counts.size))
        unigram_nats = -float(log_p[eval_targets].sum())
        seen = counts > 0
        train_bytes = float((counts * byte_len).sum())
        entropy_bits = -float((counts[seen] * np.log2(counts[seen] / counts.sum())).sum())
        self.baseline = {
            "unigram_bits_per_byte": unigram_nats / np.log(2.0) / self.eval_bytes,
            "unigram_loss": unigram_nats / eval_targets.size,
            "unigram_perplexity": float(np.exp(unigram_nats / eval_targets.size)),
            "train_unigram_entropy_bits_per_byte": entropy_bits / train_bytes,
        }

    def batch(self, step: int):
        return _step_batch(self.train.batch(step))

    def iterator(self):
        """A checkpointable grain iterator over the training batches from step 0 (batch i == `batch(i)`);
        the run saves its state in every checkpoint and restores it on --resume."""
        from mamba_jax.data.text import text_iterator

        return text_iterator(self.train.dataset.map(_step_batch))

    def add_bits_per_byte(self, metrics: Dict[str, float]) -> Dict[str, float]:
        import math

        nats = metrics["eval_loss"] * metrics["eval_tokens"]
        return {**metrics, "eval_bits_per_byte": nats / math.log(2.0) / self.eval_bytes,
                "eval_perplexity": math.exp(metrics["eval_loss"])}

    def summary(self) -> Dict[str, Any]:
        return {"train_files": self.train_files, "eval_files": self.eval_files, "train_tokens": self.train_tokens,
                "train_rows": self.train.num_rows, "eval_rows": self.eval_rows,
                "eval_rows_total": self.eval_rows_total, "eval_bytes": self.eval_bytes,
                "tokenizer": self.tokenizer.name, "tokenizer_vocab_size": self.tokenizer.vocab_size}


def build_train_state(config: LMConfig):
    """(model, freshly initialised TrainState) of `config`: float32 params and optimizer state; the model
    computes in `config.compute_dtype`."""
    import jax

    from mamba_jax.models import init_params
    from mamba_jax.models.lm import DecoderLM
    from mamba_jax.train import create_train_state, make_optimizer

    model = DecoderLM(config.model_config())
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

    model, state = build_train_state(config)
    eval_step = make_eval_step(model.apply)
    data_iterator = None
    if config.task == "text":
        task, text = None, TextData(config, out, resume=args.resume)
        get_train_batch, eval_batches, data_iterator = text.batch, text.eval_batches, text.iterator()

        def evaluate_fn(s):
            return text.add_bits_per_byte(evaluate(eval_step, s.params, eval_batches))
    else:
        task, text = config.make_task(), None
        train_data = make_dataset(task, seed=config.seed, batch_size=config.batch_size, num_batches=config.num_steps)
        eval_batches = list(make_dataset(task, seed=config.seed, batch_size=config.batch_size,
                                         num_batches=config.eval_batches, split="eval"))

        def get_train_batch(i):
            return get_batch(train_data, i)

        def evaluate_fn(s):
            return evaluate(eval_step, s.params, eval_batches)

    checkpointer = Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=config.max_checkpoints_to_keep)
    start_step = None
    if args.resume and checkpointer.latest_step() is not None:
        if data_iterator is not None and not checkpointer.has_data_iterator():
            data_iterator = None  # a checkpoint without iterator state: batches by step index (same batches)
        state, meta = checkpointer.restore(state, data_iterator=data_iterator)
        start_step = int(meta["step"])
        print(f"resumed {out} at step {start_step}", file=sys.stderr)
    # on resume: drop records (and purge TensorBoard events) of steps after the restored checkpoint
    metrics = MetricsWriter(os.path.join(out, "metrics.jsonl"), keep_until_step=start_step,
                            tensorboard_dir=os.path.join(out, "tensorboard") if config.tensorboard else None)
    print(f"lm: {task_description(config)}; writing {out}", file=sys.stderr)

    train_step = make_train_step(learning_rate_schedule(config.optimizer_config()),
                                 grad_accum_steps=config.grad_accum_steps)
    state, history = train_loop(
        state, train_step, None if data_iterator is not None else get_train_batch, loop_config,
        data_iterator=data_iterator, evaluate_fn=evaluate_fn, metrics=metrics,
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
    final = final_evals[-1] if final_evals else {"step": done, **evaluate_fn(state)}
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
        "chance_accuracy": None if task is None else task.chance_accuracy,
        "eval_sequences": text.eval_rows if text else config.eval_batches * config.batch_size,
        "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))),
        "wall_time_s": time.perf_counter() - t_start,
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {os.cpu_count()} host cores)",
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "paper": PAPER_REFERENCE[config.task],
        "config": config.to_dict(),
    }
    if text is not None:
        results.update(data=text.summary(), baseline=text.baseline)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = text_results_markdown(results) if text else results_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_history(records, os.path.join(out, "training.png"), chance=results["chance_accuracy"],
                 baseline_bpb=text.baseline["unigram_bits_per_byte"] if text else None,
                 title=f"{model_description(config)} on {config.task} ({config.preset} preset)")
    print(table)
    if text is not None:
        print(f"held-out bits per byte: {final['eval_bits_per_byte']:.4f} (Mamba) vs. "
              f"{text.baseline['unigram_bits_per_byte']:.4f} (unigram baseline from the training bytes); "
              f"loss {final['eval_loss']:.4f} nats/token, perplexity {final['eval_perplexity']:.3f}, "
              f"wall time {results['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
