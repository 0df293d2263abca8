"""`mamba-jax run m1`: M1's pipeline (Wang et al., arXiv 2504.10449) at CPU scale on verifiable arithmetic.

    mamba-jax run m1 [--preset smoke|cpu|paper] [--out DIR] [key=value ...]

Stages, each in its own folder of the run directory and each resumable (rerun the same command with the
same --out: finished stages are loaded from their orbax checkpoints, an interrupted one continues from
its last checkpoint):

1. teacher — a Llama-style TransformerLM trained by cross-entropy on the completions (prompt tokens are
   read, not predicted);
2. distill — the hybrid student: attention kept at M1's layers scaled to the depth, the other layers
   Mamba (MambaInLlama's Mamba-1 form by default, Mamba-2 with mamba_form=mamba2) initialised from the
   teacher's attention (x ← V, B ← K, C ← Q, out ← O; MLPs, norms and embeddings copied); reverse
   KL(student ‖ teacher) at T = 1 on completion tokens, the teacher run live, every parameter trained;
3. sft — cross-entropy on completions;
4. grpo — `mamba_jax.rl`: G samples per prompt at T = 0.9, binary reward (`mamba_jax.data.reasoning.reward`),
   group-normalised advantages, clipped surrogate over every completion token, entropy 0.01, no KL, two
   optimiser steps per rollout batch, gradient-norm clip 1.0 — one run per seed in `grpo_seeds`;
5. eval — after each stage, on the same distinct held-out problems: greedy pass@1, pass@1 as the mean over
   `eval_samples` samples at T = 0.7, maj@k, the mean completion length and the share of well-formed
   completions.

Writes config.json, <stage>/{checkpoints, metrics.jsonl, eval.json}, results.json, results.md (printed at
the end), grpo_curves.png and accuracy_vs_k.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.lm.config import parse_run_arguments, timestamped_run_dir
from experiments.m1.config import PRESETS, M1Config, preset_config

RESULTS_ROOT = os.path.join("results", "m1")
# M1's reported numbers (arXiv 2504.10449, Table 2: MATH500 pass@1) — a different task and scale: context only.
M1_REPORTED = {"M1-3B (MATH500 pass@1)": 84.0, "R1-Distill-Qwen-1.5B (MATH500 pass@1)": 82.8}
STAGES = ("teacher", "distill", "sft", "grpo")
# Where this run differs from M1's protocol (listed beside the results).
DEVIATIONS = (
    "task: procedurally generated integer arithmetic with step-by-step solutions (character vocabulary of 19), "
    "not math word problems (OpenR1/OpenMathInstruct, MATH500/AIME);",
    "teacher: a small Llama-style Transformer trained here from scratch, not Llama-3.2-3B-Instruct;",
    "distillation and SFT on the same synthetic problems (M1: 8B tokens of OpenMathInstruct then 8B of "
    "reasoning traces); GRPO on fresh training problems (M1: DeepScaleR); learning rates re-tuned for the size;",
    "eval: held-out problems of the same distribution; pass@1 over `eval_samples` samples at T = 0.7 and maj@k "
    "from disjoint groups of those samples;",
    "fixed time: throughput of our own batched `generate` on this machine (M1: vLLM on GPUs, up to batch 512), "
    "a pool of `time_pool` samples per problem resampled for maj@k.",
)


def parse_command_line(argv: Sequence[str]) -> Tuple[M1Config, str]:
    parser = argparse.ArgumentParser(prog="mamba-jax run m1", description=__doc__.splitlines()[0],
                                     epilog="key=value overrides any M1Config field, e.g. teacher_steps=500 "
                                            "mamba_form=mamba2 grpo_seeds=0,1,2")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--out", default=None, help="run directory (default: results/m1/<timestamp>); an "
                                                    "existing one resumes")
    args, config = parse_run_arguments(parser, argv, lambda a: preset_config(a.preset))
    return config, args.out or timestamped_run_dir(RESULTS_ROOT)


# ------------------------------------------------------------------------------------------------ models
def teacher_model(config: M1Config):
    from mamba_jax.data.reasoning import tokenizer
    from mamba_jax.models import TransformerConfig, TransformerLM

    return TransformerLM(TransformerConfig(
        vocab_size=tokenizer().vocab_size, d_model=config.d_model, n_layer=config.n_layer, n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads, d_intermediate=config.d_intermediate or None, pad_vocab_size_multiple=8))


def load_teacher(config: M1Config):
    """(config, teacher, params or None, tokenizer): a fresh Llama-style teacher over the task's character
    vocabulary, or (`config.teacher`) an HF Llama checkpoint with its own tokenizer — the config's model
    shape is then set from the checkpoint's."""
    import dataclasses

    from mamba_jax.data.reasoning import tokenizer

    if not config.teacher:
        return config, teacher_model(config), None, tokenizer()
    from mamba_jax.data import HFTokenizer
    from mamba_jax.interop import load_hf
    from mamba_jax.models import TransformerLM

    model, params = load_hf(config.teacher)
    if not isinstance(model, TransformerLM):
        raise ValueError(f"m1: `teacher` must be a Llama-style (TransformerLM) checkpoint; {config.teacher} holds a "
                         f"{type(model).__name__}")
    c = model.config
    config = dataclasses.replace(config, d_model=c.d_model, n_layer=c.n_layer, n_heads=c.n_heads,
                                 n_kv_heads=c.kv_heads, d_intermediate=c.mlp_width)
    return config, model, params, HFTokenizer.load(config.teacher)


def student_from_teacher(config: M1Config, teacher, teacher_params):
    """(HybridLM, params): the teacher's attention at `config.replaced_layers` turned into Mamba layers."""
    import jax

    from mamba_jax.distill.attention_init import attention_to_mamba1, attention_to_mamba2
    from mamba_jax.models import HybridLM

    rng = jax.random.PRNGKey(config.seed + 1)
    options = dict(conv_init=config.conv_init, ssm_init=config.ssm_init, gate_init=config.gate_init)
    if config.mamba_form == "mamba1":
        hybrid, params = attention_to_mamba1(teacher.config, teacher_params, rng, layers=config.replaced_layers,
                                             d_state=config.d_state, **options)
    else:
        hybrid, params = attention_to_mamba2(teacher.config, teacher_params, rng, layers=config.replaced_layers,
                                             chunk_size=min(64, config.seq_len), **options)
    return HybridLM(hybrid), params


def count_params(params) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


# -------------------------------------------------------------------------------------------------- data
class ReasoningData:
    """The task, its tokenizer, the SFT rows of the training problems and the held-out problems."""

    def __init__(self, config: M1Config, tok=None):
        from mamba_jax.data import TextLMData
        from mamba_jax.data.reasoning import sft_rows, tokenizer

        self.config, self.task, self.tok = config, config.task, tokenizer() if tok is None else tok
        self.train = self.task.problems(config.seed, config.n_train, "train")
        self.eval = self.task.problems(config.seed, config.n_eval, "eval", distinct=True)
        self.rows = sft_rows(self.train, self.tok, config.seq_len)
        self.lm = TextLMData(self.rows, self.tok, seed=config.seed, batch_size=config.batch_size)
        self.prompt_len = 1 + self.task.max_prompt_chars

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        b = self.lm.batch(step % len(self.lm))
        return {"inputs": b["input_ids"], "targets": b["targets"], "loss_mask": b["loss_mask"],
                "seq_idx": b["seq_idx"]}

    def rl_problems(self, seed: int, iteration: int, n: int):
        """The `n` training problems of GRPO iteration `iteration` (fresh ones, not the SFT problems')."""
        base = self.config.n_train + (seed * 100_003 + iteration) * n
        return [self.task.problem(self.config.seed, base + i, "train") for i in range(n)]

    def prompts(self, problems) -> Tuple[np.ndarray, np.ndarray]:
        from mamba_jax.data.reasoning import prompt_batch

        return prompt_batch([p.prompt for p in problems], self.tok, self.prompt_len)


# ------------------------------------------------------------------------------------------- evaluation
def generate_rows(model, params, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, *, temperature: float,
                  rng, eos_id: int, batch: int) -> np.ndarray:
    """`generate` over many rows in chunks of `batch` (the last chunk padded with copies, so every call has
    one shape and compiles once). Returns (n, max_new_tokens) int32."""
    import jax

    from mamba_jax.inference import generate

    n = ids.shape[0]
    batch = min(batch, n)
    out = []
    for i, start in enumerate(range(0, n, batch)):
        chunk_ids, chunk_mask = ids[start:start + batch], mask[start:start + batch]
        real = chunk_ids.shape[0]
        if real < batch:
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[:1], batch - real, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[:1], batch - real, 0)])
        tokens = generate(model, params, chunk_ids, max_new_tokens, temperature=temperature, eos_id=eos_id,
                          rng=jax.random.fold_in(rng, i), prompt_mask=chunk_mask)
        out.append(np.asarray(tokens)[:real])
    return np.concatenate(out)


def maj_at_k(answers: np.ndarray, truth: Sequence[int], k: int) -> float:
    """maj@k: answers (P, n) (None where unparsable) split into n // k disjoint groups of k samples per
    problem; the majority answer of each group is right or wrong; the mean over groups and problems."""
    from mamba_jax.data.reasoning import majority_vote

    n = answers.shape[1]
    hits = [majority_vote(list(answers[p, g * k:(g + 1) * k])) == truth[p]
            for p in range(answers.shape[0]) for g in range(n // k)]
    return float(np.mean(hits))


def evaluate_reasoner(model, params, data: ReasoningData, config: M1Config, *, seed: int = 0,
                      problems=None) -> Dict[str, float]:
    """Greedy pass@1, sampled pass@1 (mean over `eval_samples` at `eval_temperature`), maj@k, mean
    completion length (tokens before EOS, over samples) and the share of well-formed completions."""
    import jax

    from mamba_jax.data.reasoning import completion_texts, parse_answer

    problems = data.eval if problems is None else problems
    truth = [p.answer for p in problems]
    ids, mask = data.prompts(problems)
    kw = dict(eos_id=data.tok.eos_id, batch=config.eval_batch_size)
    greedy = completion_texts(generate_rows(model, params, ids, mask, config.max_new_tokens, temperature=0.0,
                                            rng=jax.random.PRNGKey(0), **kw), data.tok)
    n = config.eval_samples
    sampled = completion_texts(generate_rows(model, params, np.repeat(ids, n, 0), np.repeat(mask, n, 0),
                                             config.max_new_tokens, temperature=config.eval_temperature,
                                             rng=jax.random.PRNGKey(10_000 + seed), **kw), data.tok)
    answers = np.array([None if t is None else parse_answer(t) for t in sampled], object).reshape(len(problems), n)
    greedy_answers = [None if t is None else parse_answer(t) for t in greedy]
    out = {"pass@1_greedy": float(np.mean([a == y for a, y in zip(greedy_answers, truth)])),
           "pass@1": float(np.mean(answers == np.asarray(truth, object)[:, None]))}
    for k in config.ks:
        out[f"maj@{k}"] = maj_at_k(answers, truth, k)
    out["mean_length"] = float(np.mean([len(t) if t is not None else config.max_new_tokens for t in sampled]))
    out["well_formed"] = float(np.mean([a is not None for a in answers.ravel()]))
    return out


def maj_at_k_resampled(answers: np.ndarray, truth: Sequence[int], k: int, rng: np.random.Generator,
                       draws: int = 64) -> float:
    """maj@k estimated from a pool: answers (P, n) (None where unparsable); for each problem `draws` subsets
    of k of its n samples (without replacement), majority-voted; the mean hit rate. k = 0 (no sample fits
    the budget) scores 0; k = n is the vote of the whole pool."""
    from mamba_jax.data.reasoning import majority_vote

    n = answers.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"maj_at_k_resampled: `k` must lie in [0, {n}] (the pool); got {k}")
    if k == 0:
        return 0.0
    hits = [majority_vote(list(answers[p, rng.choice(n, k, replace=False)])) == truth[p]
            for p in range(answers.shape[0]) for _ in range(draws if k < n else 1)]
    return float(np.mean(hits))


def samples_in_budget(budget_s: float, samples_per_s: float, pool: int) -> int:
    """How many samples a model of throughput `samples_per_s` draws in `budget_s` seconds, at most `pool`."""
    return int(min(pool, np.floor(budget_s * samples_per_s + 1e-9)))


def fixed_time_stage(out: str, models: Dict[str, Tuple[Any, Any]], data: ReasoningData,
                     config: M1Config) -> Dict[str, Any]:
    """Accuracy at a fixed generation time (see `M1Config`), cached in out/fixed_time/result.json.

    models: {name: (model, params)}. Throughput: samples/s of `generate_rows` on `eval_batch_size` rows at
    `eval_temperature` (median of 3 timed calls after a compiling one). Returns samples/s per model and, per
    budget, each model's sample count and resampled maj@k."""
    import jax

    from mamba_jax.data.reasoning import completion_texts, parse_answer

    path = os.path.join(out, "fixed_time", "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    problems, n = data.eval, config.time_pool
    truth = [p.answer for p in problems]
    ids, mask = data.prompts(problems)
    rows = min(config.eval_batch_size, len(problems) * n)
    timing_ids, timing_mask = np.repeat(ids, n, 0)[:rows], np.repeat(mask, n, 0)[:rows]
    kw = dict(temperature=config.eval_temperature, eos_id=data.tok.eos_id)
    rate, pools = {}, {}
    for name, (model, params) in models.items():
        run_once = lambda i: generate_rows(model, params, timing_ids, timing_mask, config.max_new_tokens,   # noqa: E731
                                           rng=jax.random.PRNGKey(i), batch=rows, **kw)
        run_once(0)
        times = []
        for i in range(3):
            t = time.perf_counter()
            run_once(i + 1)
            times.append(time.perf_counter() - t)
        rate[name] = rows / float(np.median(times))
        texts = completion_texts(generate_rows(model, params, np.repeat(ids, n, 0), np.repeat(mask, n, 0),
                                               config.max_new_tokens, rng=jax.random.PRNGKey(20_000),
                                               batch=config.eval_batch_size, **kw), data.tok)
        pools[name] = np.array([None if t is None else parse_answer(t) for t in texts], object).reshape(-1, n)
    budgets = np.geomspace(1.0 / max(rate.values()), n / min(rate.values()), config.time_budgets)
    rng = np.random.default_rng(config.seed)
    curve = []
    for b in budgets:
        point = {"budget_s": float(b)}
        for name in models:
            k = samples_in_budget(b, rate[name], n)
            point[name] = {"k": k, "accuracy": maj_at_k_resampled(pools[name], truth, k, rng)}
        curve.append(point)
    result = {"samples_per_s": rate, "rows_per_call": rows, "pool": n, "curve": curve}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


# ---------------------------------------------------------------------------------------- stage helpers
def _loop_config(config: M1Config, steps: int):
    from mamba_jax.train import LoopConfig

    log_every = min(config.log_every, steps)
    every = log_every * max(1, (steps // 4) // log_every)
    return LoopConfig(num_steps=steps, log_every=log_every, eval_every=steps, checkpoint_every=every,
                      progress=config.progress)


def _optimizer(config: M1Config, lr: float, steps: int, *, warmup: Optional[int] = None, constant: bool = False,
               weight_decay: Optional[float] = None):
    from mamba_jax.train.optim import OptimizerConfig, make_optimizer

    warmup = min(config.warmup_steps if warmup is None else warmup, steps - 1)
    return make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=warmup, total_steps=steps,
                                          end_lr_ratio=1.0 if constant else 0.1, grad_clip_norm=config.grad_clip_norm,
                                          weight_decay=config.weight_decay if weight_decay is None else weight_decay))


def train_stage(name: str, out: str, model, params, step_fn: Callable, tx, data: ReasoningData, steps: int,
                config: M1Config):
    """Train `params` for `steps` steps of `step_fn(state, batch)` with checkpoints in out/<name>; resumes
    from the latest one. Returns the trained params."""
    from mamba_jax.train import Checkpointer, MetricsWriter, create_train_state, train_loop

    folder = os.path.join(out, name)
    state = create_train_state(model.apply, params, tx)
    checkpointer = Checkpointer(os.path.join(folder, "checkpoints"), max_to_keep=1)
    start = None
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        start = int(meta["step"])
    metrics = MetricsWriter(os.path.join(folder, "metrics.jsonl"), keep_until_step=start)
    if start is None or start < steps:
        state, _ = train_loop(state, step_fn, data.batch, _loop_config(config, steps), metrics=metrics,
                              checkpointer=checkpointer, checkpoint_meta=lambda s: {"step": s})
    checkpointer.close()
    metrics.close()
    return state.params


def stage_eval(name: str, out: str, model, params, data: ReasoningData, config: M1Config) -> Dict[str, float]:
    """`evaluate_reasoner` of a finished stage, cached in out/<name>/eval.json."""
    path = os.path.join(out, name, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t = time.perf_counter()
    result = evaluate_reasoner(model, params, data, config)
    result["eval_s"] = round(time.perf_counter() - t, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


# ------------------------------------------------------------------------------------------------- GRPO
def grpo_stage(name: str, out: str, model, params, data: ReasoningData, config: M1Config, seed: int):
    """GRPO from `params` for `config.grpo_iterations` iterations (seed `seed`: its prompts and samples),
    checkpointed every `grpo_eval_every` iterations in out/<name>; every `grpo_eval_every` iterations the
    greedy pass@1 on the held-out problems is logged. Returns (params, records)."""
    import jax
    from tqdm.auto import tqdm

    from mamba_jax.data.reasoning import completion_rewards
    from mamba_jax.rl import GRPOConfig, grpo_iteration, make_grpo_step
    from mamba_jax.train import Checkpointer, MetricsWriter, create_train_state, read_jsonl

    grpo = GRPOConfig(group_size=config.group_size, temperature=config.rollout_temperature,
                      max_new_tokens=config.max_new_tokens, clip_eps=config.clip_eps,
                      entropy_coef=config.entropy_coef, kl_coef=config.kl_coef,
                      updates_per_rollout=config.updates_per_rollout)
    steps = config.grpo_iterations * config.updates_per_rollout
    # M1 (veRL): constant learning rate, no warm-up, weight decay 0.01, gradient clip 1.0
    tx = _optimizer(config, config.grpo_lr, steps, warmup=0, constant=True, weight_decay=0.01)
    folder = os.path.join(out, name)
    state = create_train_state(model.apply, params, tx)
    checkpointer = Checkpointer(os.path.join(folder, "checkpoints"), max_to_keep=1)
    start = 0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        start = int(meta["step"])
    metrics = MetricsWriter(os.path.join(folder, "metrics.jsonl"), keep_until_step=start)
    step_fn = make_grpo_step(grpo)
    probe = data.eval[:min(len(data.eval), 128)]

    def greedy_pass(p):
        return evaluate_greedy(model, p, data, config, probe)

    if start == 0:
        metrics.write({"kind": "eval", "step": 0, "pass@1_greedy": greedy_pass(state.params)})
    bar = tqdm(total=config.grpo_iterations, initial=start, desc=name, disable=not config.progress,
               dynamic_ncols=True)
    for it in range(start, config.grpo_iterations):
        problems = data.rl_problems(seed, it, config.grpo_prompts)
        ids, mask = data.prompts(problems)
        answers = np.repeat([p.answer for p in problems], config.group_size)
        t = time.perf_counter()
        state, m = grpo_iteration(model, state, step_fn, ids, mask,
                                  lambda tokens: completion_rewards(tokens, answers, data.tok),
                                  jax.random.fold_in(jax.random.PRNGKey(seed), it), grpo, eos_id=data.tok.eos_id)
        metrics.write({"kind": "train", "step": it + 1, **m, "elapsed_s": round(time.perf_counter() - t, 3)})
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}")
        if (it + 1) % config.grpo_eval_every == 0 or it + 1 == config.grpo_iterations:
            metrics.write({"kind": "eval", "step": it + 1, "pass@1_greedy": greedy_pass(state.params)})
            checkpointer.save(it + 1, state, {"step": it + 1})
    bar.close()
    checkpointer.close()
    metrics.close()
    return state.params, read_jsonl(os.path.join(folder, "metrics.jsonl"))


def evaluate_greedy(model, params, data: ReasoningData, config: M1Config, problems) -> float:
    import jax

    from mamba_jax.data.reasoning import completion_rewards

    ids, mask = data.prompts(problems)
    tokens = generate_rows(model, params, ids, mask, config.max_new_tokens, temperature=0.0,
                           rng=jax.random.PRNGKey(0), eos_id=data.tok.eos_id, batch=config.eval_batch_size)
    return float(completion_rewards(tokens, [p.answer for p in problems], data.tok).mean())


# ---------------------------------------------------------------------------------------------- results
def results_markdown(results: Dict[str, Any]) -> str:
    from mamba_jax.bench_utils import markdown_table

    ks = results["ks"]
    header = ["model", "params", "greedy pass@1", f"pass@1 (T={results['eval_temperature']}, n={results['eval_samples']})",
              *[f"maj@{k}" for k in ks], "mean length", "well formed"]
    rows = []
    for name, r in results["stages"].items():
        rows.append([name, r["params"], f"{r['pass@1_greedy']:.3f}", f"{r['pass@1']:.3f}",
                     *[f"{r[f'maj@{k}']:.3f}" for k in ks], f"{r['mean_length']:.1f}", f"{r['well_formed']:.3f}"])
    lines = [f"# M1 at {results['preset']} scale: teacher → distill → SFT → GRPO", "",
             f"{results['task']}; {results['n_eval']} held-out problems. Student: {results['student']}.", "",
             markdown_table(header, rows), ""]
    claims = results["claims"]
    lines += ["Claims of the issue at this scale:", ""]
    lines += [f"- {c['claim']}: **{'yes' if c['holds'] else 'no'}** ({c['measured']})" for c in claims]
    fixed = results.get("fixed_time")
    if fixed:
        names = list(fixed["samples_per_s"])
        rate = fixed["samples_per_s"]
        lines += [f"Self-consistency at a fixed generation time (pool of {fixed['pool']} samples per problem, "
                  f"throughput at {fixed['rows_per_call']} rows per call): "
                  + ", ".join(f"{n} {rate[n]:.0f} samples/s" for n in names)
                  + f" (ratio {rate[names[1]] / rate[names[0]]:.2f}).", "",
                  markdown_table(["budget (ms / problem)", *[f"{n}: k, maj@k" for n in names]],
                                 [[f"{1e3 * p['budget_s']:.3g}", *[f"{p[n]['k']}, {p[n]['accuracy']:.3f}" for n in names]]
                                  for p in fixed["curve"]]), ""]
    lines += ["", "M1's reported numbers (another task and scale, context only): "
              + "; ".join(f"{k} {v}" for k, v in M1_REPORTED.items()), "", "Deviations from M1's protocol:", ""]
    lines += [f"- {d}" for d in DEVIATIONS]
    lines += ["", f"Hardware: {results['hardware']}; total {results['elapsed_min']:.1f} min."]
    return "\n".join(lines) + "\n"


def claims_of(stages: Dict[str, Dict[str, Any]], ks: Sequence[int]) -> List[Dict[str, Any]]:
    teacher, sft = stages["teacher"], stages["sft"]
    grpo = [r for name, r in stages.items() if name.startswith("grpo")]
    out = [{"claim": "distilled + SFT student within 90 % of the teacher's pass@1",
            "holds": sft["pass@1"] >= 0.9 * teacher["pass@1"],
            "measured": f"{sft['pass@1']:.3f} vs 0.9 × {teacher['pass@1']:.3f}"}]
    if grpo:
        gains = [r["pass@1"] - sft["pass@1"] for r in grpo]
        spread = max(r["pass@1"] for r in grpo) - min(r["pass@1"] for r in grpo)
        out.append({"claim": "GRPO raises held-out pass@1 over SFT by more than the spread across seeds",
                    "holds": min(gains) > spread if len(grpo) > 1 else min(gains) > 0,
                    "measured": f"gains {', '.join(f'{g:+.3f}' for g in gains)}; spread {spread:.3f}"})
    k = max(ks)
    last = grpo[-1] if grpo else sft
    out.append({"claim": f"maj@{k} above pass@1", "holds": last[f"maj@{k}"] > last["pass@1"],
                "measured": f"{last[f'maj@{k}']:.3f} vs {last['pass@1']:.3f}"})
    return out


def plot_results(results: Dict[str, Any], grpo_records: Dict[str, List[Dict[str, Any]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, records in grpo_records.items():
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        axes[0].plot([r["step"] for r in train], [r["reward"] for r in train], alpha=0.6, label=name)
        axes[1].plot([r["step"] for r in evals], [r["pass@1_greedy"] for r in evals], marker="o", label=name)
    axes[0].set(xlabel="GRPO iteration", ylabel="mean reward (training rollouts)", title="reward")
    axes[1].set(xlabel="GRPO iteration", ylabel="held-out greedy pass@1", title="pass@1 during GRPO")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grpo_curves.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ks = results["ks"]
    for name, r in results["stages"].items():
        ax.plot(ks, [r[f"maj@{k}"] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k (samples voted)", ylabel="maj@k", title="accuracy vs k (self-consistency)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_k.png"), dpi=120)
    plt.close(fig)
    fixed = results.get("fixed_time")
    if fixed:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for name in fixed["samples_per_s"]:
            ax.plot([1e3 * p["budget_s"] for p in fixed["curve"]], [p[name]["accuracy"] for p in fixed["curve"]],
                    marker="o", label=f"{name} ({fixed['samples_per_s'][name]:.0f} samples/s)")
        ax.set_xscale("log")
        ax.set(xlabel="generation time per problem (ms)", ylabel="maj@k within the budget",
               title="self-consistency at a fixed time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "accuracy_vs_time.png"), dpi=120)
        plt.close(fig)


# -------------------------------------------------------------------------------------------------- run
def run(config: M1Config, out: str) -> Dict[str, Any]:
    from mamba_jax.bench_utils import hardware_description
    from mamba_jax.distill.train import STAGE2_KD, make_kd_train_step
    from mamba_jax.models import init_params
    from mamba_jax.train import make_train_step

    import jax

    t0 = time.perf_counter()
    config, teacher, teacher_params, tok = load_teacher(config)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    data = ReasoningData(config, tok)
    stages: Dict[str, Dict[str, Any]] = {}

    steps = config.teacher_steps
    if teacher_params is None:
        teacher_params = init_params(teacher, jax.random.PRNGKey(config.seed))
    if steps:
        teacher_params = train_stage("teacher", out, teacher, teacher_params, make_train_step(),
                                     _optimizer(config, config.teacher_lr, steps), data, steps, config)
    stages["teacher"] = dict(stage_eval("teacher", out, teacher, teacher_params, data, config),
                             params=count_params(teacher_params))

    student, params = student_from_teacher(config, teacher, teacher_params)
    stages["student at init"] = dict(stage_eval("student_init", out, student, params, data, config),
                                     params=count_params(params))
    kd = make_kd_train_step(teacher.apply, STAGE2_KD)
    params = train_stage("distill", out, student, params, lambda s, b: kd(s, teacher_params, b),
                         _optimizer(config, config.distill_lr, config.distill_steps), data, config.distill_steps,
                         config)
    stages["distill"] = dict(stage_eval("distill", out, student, params, data, config), params=count_params(params))
    params = train_stage("sft", out, student, params, make_train_step(),
                         _optimizer(config, config.sft_lr, config.sft_steps), data, config.sft_steps, config)
    stages["sft"] = dict(stage_eval("sft", out, student, params, data, config), params=count_params(params))

    grpo_records, grpo_params_of = {}, {}
    for seed in config.seeds:
        name = f"grpo_seed{seed}"
        grpo_params, grpo_records[name] = grpo_stage(name, out, student, params, data, config, seed)
        grpo_params_of[name] = grpo_params
        stages[name] = dict(stage_eval(name, out, student, grpo_params, data, config),
                            params=count_params(grpo_params))

    first_grpo = f"grpo_seed{config.seeds[0]}"
    fixed_time = fixed_time_stage(out, {"teacher": (teacher, teacher_params),
                                        f"student ({first_grpo})": (student, grpo_params_of[first_grpo])},
                                  data, config)

    kinds = student.config.layer_kinds
    results = {
        "experiment": "m1", "preset": config.preset, "config": config.to_dict(),
        "task": (f"arithmetic chains of {config.min_terms}–{config.max_terms} terms of ≤ {config.max_digits} digits"
                 + (f", products with probability {config.product_prob}" if config.product_prob else "")),
        "student": (f"{len(kinds)} layers, attention at {list(config.kept_attention)}, "
                    f"{config.mamba_form} at {list(config.replaced_layers)}"),
        "n_eval": len(data.eval), "eval_samples": config.eval_samples, "eval_temperature": config.eval_temperature,
        "ks": list(config.ks), "stages": stages, "claims": claims_of(stages, config.ks), "fixed_time": fixed_time,
        "m1_reported": M1_REPORTED, "deviations": list(DEVIATIONS), "hardware": hardware_description(),
        "elapsed_min": (time.perf_counter() - t0) / 60,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = results_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plot_results(results, grpo_records, out)
    print(text)
    print(f"wrote {out}/results.md, results.json, grpo_curves.png, accuracy_vs_k.png, accuracy_vs_time.png")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, out = parse_command_line([] if argv is None else argv)
    run(config, out)
    return 0
