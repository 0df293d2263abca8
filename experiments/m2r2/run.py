"""`mamba-jax run m2r2`: M2R2's fast residual stream (Bhendawade et al., arXiv 2502.02040) over a frozen base.

    mamba-jax run m2r2 [--preset smoke|cpu|paper] [--out DIR] [key=value ...]

Stages (each in its own folder of the run directory, each resumable: rerun with the same --out):

1. base — a Llama-style Transformer trained on held-in standard-library sources (BPE), or an HF Llama
   checkpoint (`base=<folder>`);
2. fast — the fast stream (`mamba_jax.models.m2r2`): the base's first `n_fast` layers at rate
   n_layer / n_fast with low-rank adapters, trained on alignment + KL with the base frozen (checked bitwise);
3. draft — a small Transformer of the fast stream's cost per token (the two-model speculative baseline);
4. early exit — on held-out rows: tokens stop at the first exit whose score passes a threshold (swept):
   M2R2 (the fast stream's confidence), the slow stream's confidence through the shared head (no adapters)
   and its residual distance (distance-based), at the same exit points; and skip decoding (SkipDecode's
   position schedule, swept). Quality: agreement with the full model's greedy token and held-out NLL;
   cost: mean layers per token;
5. speculative — plain decoding of the base against speculative decoding drafted by the fast stream
   (self-speculative, M2R2), by the slow stream's first layers without adapters (LayerSkip-style) and by the
   small draft model (two-model): tokens/s, acceptance, τ; greedy tokens checked equal to plain decoding;
6. experts — for each MoE pattern, a model and its fast stream; the hit rate of predicting layer j's
   experts by applying its router to the residual after i < j layers (slow stream vs fast stream), per
   distance j − i; a cost model of decode latency with experts in host memory, on demand vs prefetched.

Writes config.json, results.json, results.md (printed), quality_vs_layers.png, speculative.png,
expert_hit_rate.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.lm.config import parse_run_arguments, timestamped_run_dir
from experiments.m1.run import count_params, train_stage   # checkpointed, resumable stages (out/<name>)
from experiments.m2r2.config import PRESETS, M2R2Config, preset_config

RESULTS_ROOT = os.path.join("results", "m2r2")
# The paper's reported numbers (arXiv 2502.02040, abstract): context only — other models, tasks and hardware.
M2R2_REPORTED = {
    "self-speculative decoding speed-up (MT-Bench)": "up to 2.8x",
    "ahead-of-time expert loading speed-up (MoE)": "up to 2.9x",
    "early exit": "better quality / speed trade-off than distance-based early exit, skip decoding, MoD",
}
# Where this run differs from the paper (listed beside the results). Only the abstract is public.
DEVIATIONS = (
    "design: our reading of the abstract (no code or full text is public): g_{i+1} = g_i + r·(layer_i(g_i) − g_i) "
    "+ adapter_i(g_i), trained on 1 − cos(g_k, h_round(r·k)) + KL(full ‖ fast);",
    "data: BPE on standard-library Python sources, base model trained here (the paper: pretrained LLMs, "
    "MT-Bench and other chat benchmarks — not reachable offline);",
    "early exit is evaluated teacher-forced: every exit reads the full model's context (keys and values of all "
    "layers at earlier positions); a layer counts as run once per token — on the no-exit path the fast and slow "
    "streams share each of the first n_fast layers' weight reads (memory-bound decoding);",
    "skip decoding: SkipDecode's linear position schedule on the frozen model (SkipDecode fine-tunes with it);",
    "expert loading: this CPU has one memory, so loading is a cost model with the measured hit rates and the "
    "chips' published bandwidths, not a measured transfer.",
)
KV_DEVIATION = {
    True: "the KV cache is shared as we read the abstract: the fast stream's attention reads the slow stream's keys "
          "and values at earlier tokens and its own at the current one (in training too); within a draft round "
          "it reads its own draft tokens' keys, which the verify call then overwrites; recurrent layers keep "
          "their own state;",
    False: "shared_kv=False: the fast stream keeps its own KV / recurrent cache (M2R2 shares the KV cache "
           "between the streams);",
}


def deviations(config) -> List[str]:
    """Where this run differs from the paper, for results.json / results.md."""
    return [DEVIATIONS[0], KV_DEVIATION[bool(config.shared_kv)], *DEVIATIONS[1:]]


# Published bandwidths (vendor spec sheets): HBM, and the host link per direction (PCIe x16).
CHIPS = {
    "A100 80GB SXM (HBM2e 2.0 TB/s, PCIe 4.0 x16 32 GB/s)": (2.0e12, 32e9),
    "H100 SXM (HBM3 3.35 TB/s, PCIe 5.0 x16 64 GB/s)": (3.35e12, 64e9),
    "H200 (HBM3e 4.8 TB/s, PCIe 5.0 x16 64 GB/s)": (4.8e12, 64e9),
    "GH200 (HBM3 4.0 TB/s, NVLink-C2C 450 GB/s per direction)": (4.0e12, 450e9),
}
# A named MoE shape for the cost model (Mixtral-8x7B: 32 layers, d 4096, 8 experts of SwiGLU 14336, top-2,
# GQA 32/8 heads of 128), bf16.
MIXTRAL_SHAPE = dict(n_layers=32, d_model=4096, d_expert=14336, n_experts=8, k=2, q_heads=32, kv_heads=8,
                     head_dim=128, bytes_per_param=2)


def parse_command_line(argv: Sequence[str]) -> Tuple[M2R2Config, str]:
    parser = argparse.ArgumentParser(prog="mamba-jax run m2r2", description=__doc__.splitlines()[0],
                                     epilog="key=value overrides any M2R2Config field, e.g. adapter_steps=1000 "
                                            "n_fast=2 moe_patterns='A E'")
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--out", default=None, help="run directory (default: results/m2r2/<timestamp>); an "
                                                    "existing one resumes")
    args, config = parse_run_arguments(parser, argv, lambda a: preset_config(a.preset))
    return config, args.out or timestamped_run_dir(RESULTS_ROOT)


# ------------------------------------------------------------------------------------------------ pieces
def params_digest(params) -> str:
    """sha256 of every leaf's bytes, in tree order: equal digests mean bitwise-equal parameters."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


class TextCorpus:
    """The held-in / held-out text of a run: `experiments.lm.run.TextData` with a BPE tokenizer (saved as
    <out>/tokenizer.json), or an HF base's own tokenizer (`HFTokenizer`)."""

    def __init__(self, config: M2R2Config, out: str, vocab_size: int):
        from experiments.lm.config import LMConfig
        from experiments.lm.run import TextData

        lm = LMConfig(preset="cpu" if config.preset == "paper" else config.preset, task="text",
                      seed=config.seed, seq_len=config.seq_len, text_max_files=config.text_max_files,
                      tokenizer="bpe", bpe_vocab_size=vocab_size, batch_size=config.batch_size,
                      text_eval_fraction=0.1, eval_batches=config.eval_batches)
        tokenizer = None
        if config.base:
            from mamba_jax.data import HFTokenizer

            tokenizer = HFTokenizer.load(config.base)
        self.data = TextData(lm, out, resume=True, tokenizer=tokenizer)
        self.tokenizer = self.data.tokenizer

    def batch(self, step: int):
        return self.data.batch(step)

    @property
    def eval_batches(self) -> List[Dict[str, Any]]:
        return self.data.eval_batches

    def prompts(self, n: int, length: int) -> np.ndarray:
        """(n, length) held-out prompts: row starts that lie inside one document (n distinct rows where the
        held-out data has them)."""
        rows = []
        for b in self.eval_batches:
            for ids, seq, keep in zip(b["inputs"], b["seq_idx"], b["loss_mask"]):
                if keep[:length].all() and (seq[:length] == seq[0]).all():
                    rows.append(ids[:length])
        if not rows:
            raise ValueError(f"m2r2: no held-out row has {length} tokens of one document; lower `prompt_len`")
        return np.stack([rows[i % len(rows)] for i in range(n)]).astype(np.int32)


class ReasoningCorpus:
    """M1's arithmetic task (the data of an `m1_run` base), with `TextCorpus`'s interface: training rows of
    the m1 run's training problems, held-out rows (`sft_rows`) and prompts of its held-out problems."""

    def __init__(self, m1_config, batch_size: int, eval_batches: int):
        import dataclasses

        from experiments.m1.run import ReasoningData
        from mamba_jax.data.reasoning import sft_rows

        self.data = ReasoningData(dataclasses.replace(m1_config, batch_size=batch_size))
        self.tokenizer = self.data.tok
        rows = sft_rows(self.data.eval, self.tokenizer, m1_config.seq_len)
        n = max(1, min(eval_batches * batch_size, rows["input_ids"].shape[0]) // batch_size) * batch_size
        keys = {"inputs": "input_ids", "targets": "targets", "loss_mask": "loss_mask", "seq_idx": "seq_idx"}
        self.eval_batches = [{k: np.asarray(rows[v][i:i + batch_size]) for k, v in keys.items()}
                             for i in range(0, n, batch_size)]

    def batch(self, step: int):
        return self.data.batch(step)

    def prompts(self, n: int, length: int) -> List[np.ndarray]:
        """The prompts (BOS + statement, (L_i,), lengths differ) of the first n held-out problems (cycled);
        `length` is unused."""
        ids, mask = self.data.prompts([self.data.eval[i % len(self.data.eval)] for i in range(n)])
        return [ids[i][mask[i] == 1].astype(np.int32) for i in range(n)]


def load_m1_teacher(folder: str):
    """(teacher model, its trained params, M1Config) of an `mamba-jax run m1` folder (read only)."""
    import jax

    from experiments.m1.config import M1Config
    from experiments.m1.run import _optimizer as m1_optimizer, teacher_model
    from mamba_jax.models import init_params
    from mamba_jax.train import Checkpointer, create_train_state

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"m2r2: `m1_run` must be a `mamba-jax run m1` folder with config.json; {folder} has none")
    with open(path) as f:
        m1 = M1Config(**json.load(f))
    if m1.teacher:
        raise ValueError(f"m2r2: the m1 run in {folder} uses the HF teacher {m1.teacher}: pass it as `base`")
    model = teacher_model(m1)
    checkpoints = Checkpointer(os.path.join(folder, "teacher", "checkpoints"), max_to_keep=1)
    try:
        if checkpoints.latest_step() is None:
            raise ValueError(f"m2r2: no teacher checkpoint in {folder}/teacher/checkpoints (has the m1 run "
                             "finished its teacher stage?)")
        template = create_train_state(model.apply, init_params(model, jax.random.PRNGKey(0)),
                                      m1_optimizer(m1, m1.teacher_lr, max(m1.teacher_steps, 1)))
        state, _ = checkpoints.restore(template)
    finally:
        checkpoints.close()
    return model, state.params, m1


def _optimizer(config: M2R2Config, lr: float, steps: int):
    from mamba_jax.train.optim import OptimizerConfig, make_optimizer

    return make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=min(config.warmup_steps, max(steps - 1, 0)),
                                          total_steps=max(steps, 1), grad_clip_norm=config.grad_clip_norm,
                                          weight_decay=config.weight_decay))


def train_lm(name: str, out: str, model, data, steps: int, lr: float, config: M2R2Config, params=None, seed=0):
    import jax

    from mamba_jax.models import init_params
    from mamba_jax.train import make_train_step

    if params is None:
        params = init_params(model, jax.random.PRNGKey(seed), seq_len=config.seq_len)
    if not steps:
        return params
    return train_stage(name, out, model, params, make_train_step(), _optimizer(config, lr, steps), data, steps,
                       config)


def train_fast_stream(name: str, out: str, base, base_params, n_fast: int, rate: float, data, steps: int,
                      config: M2R2Config):
    """(fast model, fast params, metrics): adapters trained on `m2r2_loss`; base weights checked unchanged."""
    import jax

    from mamba_jax.models.m2r2 import adapter_params, fast_stream, fast_stream_params, make_m2r2_train_step

    fast = fast_stream(base, n_fast, rank=config.adapter_rank, rate=rate)
    params = fast_stream_params(fast, base_params, jax.random.PRNGKey(config.seed + 7))
    adapters = adapter_params(params)
    frozen = {k: v for k, v in params.items() if k not in adapters}
    before = params_digest(base_params)
    tx = _optimizer(config, config.adapter_lr, steps)
    step = make_m2r2_train_step(fast, base, tx, align_weight=config.align_weight, kl_weight=config.kl_weight,
                                shared_kv=config.shared_kv)

    def step_fn(state, batch):
        new, opt_state, metrics = step(state.params, state.opt_state, frozen, base_params, batch["inputs"],
                                       batch["loss_mask"], batch.get("seq_idx"))
        metrics = {**metrics, "accuracy": metrics["agreement"]}   # the loop's progress shows "accuracy"
        return state.replace(step=state.step + 1, params=new, opt_state=opt_state), metrics

    if steps:   # a stage folder per KV mode: a rerun with the other mode never resumes these adapters
        stage = name if config.shared_kv else f"{name}_own_kv"
        adapters = train_stage(stage, out, fast, adapters, step_fn, tx, data, steps, config)
    unchanged = params_digest(base_params) == before
    if not unchanged:
        raise AssertionError(f"m2r2: training the {name} adapters changed the base weights")
    return fast, {**frozen, **adapters}, dict(adapter_params=count_params(adapters), base_unchanged=unchanged)


def base_model(config: M2R2Config, vocab_size: int):
    from mamba_jax.models import TransformerConfig, TransformerLM

    return TransformerLM(TransformerConfig(vocab_size=vocab_size, d_model=config.d_model,
                                           n_layer=config.n_layer, n_heads=config.n_heads,
                                           n_kv_heads=config.n_kv_heads,
                                           d_intermediate=config.d_intermediate or None))


def moe_model(config: M2R2Config, unit: str, vocab_size: int):
    from mamba_jax.layers.moe import MoEBlockConfig, MoEConfig
    from mamba_jax.models import HybridConfig, HybridLM, MambaConfig, TransformerConfig

    d = config.moe_d_model
    kinds = unit.split()
    pattern = " ".join(kinds * (config.moe_n_layer // len(kinds)))
    moe = MoEConfig(n_experts=config.n_experts, router="switch", capacity_factor_train=1.0, capacity_factor_eval=None,
                    aux_loss_coef=0.01)
    return HybridLM(HybridConfig(pattern=pattern, vocab_size=vocab_size, d_model=d,
                                 attention=TransformerConfig(n_heads=max(1, d // 32), d_intermediate=0),
                                 mamba=MambaConfig(d_intermediate=0), moe=MoEBlockConfig(moe=moe)))


# ------------------------------------------------------------------------------------------------ early exit
LOWER_IS_BETTER = {"nll"}


def _frontier(points: List[Dict[str, float]], key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(layers, `key`) of the sweep points no other point beats with fewer or equal layers (the Pareto
    frontier; for "nll" lower is better); between two of them a mix of their thresholds reaches the line."""
    sign = -1.0 if key in LOWER_IS_BETTER else 1.0
    pts = sorted(points, key=lambda p: (p["mean_layers"], -sign * p[key]))
    xs, ys = [], []
    for p in pts:
        if not ys or sign * p[key] > sign * ys[-1]:
            xs.append(p["mean_layers"])
            ys.append(p[key])
    return np.asarray(xs), np.asarray(ys)


def quality_at(points: List[Dict[str, float]], layers: float, key: str = "agreement") -> Optional[float]:
    """The best `key` a method reaches within `layers` mean layers (linear between its frontier points); None
    below its cheapest point."""
    xs, ys = _frontier(points, key)
    if not len(xs) or layers < xs[0] - 1e-9:
        return None
    return float(np.interp(layers, xs, ys))


def early_exit_sweep(base, base_params, fast, fast_params, batches, config: M2R2Config) -> Dict[str, Any]:
    """Quality vs mean layers of every early-exit method on `batches` (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from mamba_jax.models.m2r2 import (early_exit_point, early_exit_quality, exit_logits, prediction_quality,
                                       residual_distances, skip_decoding_layer_mask)

    n_layer, n_fast = base.config.n_layer, fast.config.n_layer
    exits = list(range(1, n_fast + 1))
    fwd = jax.jit(lambda p, ids, seq: base.apply({"params": p}, ids, seq_idx=seq, return_hidden_states=True,
                                                 method="forward"))
    fast_exits = jax.jit(lambda p, ids, seq, slow: exit_logits(fast, p, ids, n_fast, seq_idx=seq,
                                                               shared_kv_states=slow))
    slow_exits = jax.jit(lambda p, ids, seq: exit_logits(base, p, ids, n_fast, seq_idx=seq))
    masked = jax.jit(lambda p, ids, seq, lm: base.apply({"params": p}, ids, seq_idx=seq, layer_mask=lm,
                                                    method="forward").logits)
    collected = {k: [] for k in ("full", "fast", "slow", "dist", "targets", "mask")}
    for b in batches:
        out = fwd(base_params, b["inputs"], b["seq_idx"])
        collected["full"].append(out.logits)
        collected["fast"].append(fast_exits(fast_params, b["inputs"], b["seq_idx"],
                                            out.hidden_states if config.shared_kv else None))
        collected["slow"].append(slow_exits(base_params, b["inputs"], b["seq_idx"]))
        collected["dist"].append(residual_distances(out.hidden_states)[:n_fast])
        collected["targets"].append(jnp.asarray(b["targets"]))
        collected["mask"].append(jnp.asarray(b["loss_mask"]))
    full = jnp.concatenate(collected["full"], 0)
    fast_l = jnp.concatenate(collected["fast"], 1)
    slow_l = jnp.concatenate(collected["slow"], 1)
    dist = jnp.concatenate(collected["dist"], 1)
    targets = jnp.concatenate(collected["targets"], 0)
    mask = jnp.concatenate(collected["mask"], 0)
    full_quality = prediction_quality(full, full, targets, mask)
    confidence = lambda logits: jnp.max(jax.nn.softmax(logits, -1), -1)   # noqa: E731
    methods = {"M2R2 (fast stream, confidence)": (confidence(fast_l), fast_l),
               "slow stream, confidence (no adapters)": (confidence(slow_l), slow_l),
               "slow stream, distance-based": (-dist, slow_l)}
    sel = np.asarray(mask, bool)
    sweeps: Dict[str, List[Dict[str, float]]] = {}
    for name, (scores, logits) in methods.items():
        values = np.asarray(scores)[:, sel].ravel()
        thresholds = sorted(set(np.quantile(values, np.linspace(0, 1, config.exit_thresholds)).tolist()))
        points = []
        for th in thresholds + [np.inf]:
            first, layers = early_exit_point(scores, th, exits, n_layer)
            agree, nll = early_exit_quality(logits, full, targets, first, mask)
            points.append(dict(threshold=float(th), mean_layers=float(jnp.sum(layers * mask) / mask.sum()),
                               agreement=agree, nll=nll))
        sweeps[name] = points
    # skip decoding: SkipDecode's schedule from max_layers = n_layer down to min_layers, swept
    skip_points = []
    warm = min(config.skip_warmup_layers, n_layer)
    for min_layers in range(max(warm, 1), n_layer + 1):
        run_mask, _ = skip_decoding_layer_mask(batches[0]["inputs"].shape[1], n_layer, max_layers=n_layer,
                                               min_layers=min_layers, warmup_layers=warm)
        logits = []
        for b in batches:
            lm = jnp.broadcast_to(run_mask, (b["inputs"].shape[0],) + run_mask.shape)
            logits.append(masked(base_params, b["inputs"], b["seq_idx"], lm))
        logits = jnp.concatenate(logits, 0)
        agree, nll = prediction_quality(logits, full, targets, mask)
        layers = jnp.broadcast_to(run_mask.sum(-1), mask.shape)
        skip_points.append(dict(min_layers=min_layers, mean_layers=float(jnp.sum(layers * mask) / mask.sum()),
                                agreement=agree, nll=nll))
    sweeps["skip decoding (SkipDecode schedule)"] = skip_points
    budgets = sorted({round(n_layer * f, 3) for f in (0.5, 0.625, 0.75, 0.875)})
    at_budget = {name: {str(L): quality_at(points, L) for L in budgets} for name, points in sweeps.items()}
    nll_at = {name: {str(L): quality_at(points, L, "nll") for L in budgets} for name, points in sweeps.items()}
    return dict(n_layer=n_layer, exit_layers=exits, tokens=int(sel.sum()), full_model_nll=full_quality[1],
                sweeps=sweeps, agreement_at_layers=at_budget, nll_at_layers=nll_at, budgets=budgets)


# ------------------------------------------------------------------------------------------------ speculative
def pool_prompt_timings(per_prompt: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """`time_speculative` results of several prompts (each decoded alone) pooled into one: tokens/s = all
    tokens / all seconds; τ and acceptance weighted by target calls (each call proposes the same number of
    drafts); target calls summed; greedy tokens equal only if equal for every prompt; τ per prompt kept."""
    def total(key, runs):
        return sum(r[key] for r in runs)

    plains = [t["plain"] for t in per_prompt]
    plain_s = total("seconds", plains)
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in plains)
    drafts = {}
    for name in per_prompt[0]["drafts"]:
        runs = [t["drafts"][name] for t in per_prompt]
        seconds, calls = total("seconds", runs), total("target_calls", runs)
        same = [r["same_tokens"] for r in runs]
        drafts[name] = dict(
            tokens_per_s=tokens / seconds, seconds=seconds, speedup=plain_s / seconds, target_calls=calls,
            tau=sum(r["tau"] * r["target_calls"] for r in runs) / calls,
            acceptance_rate=sum(r["acceptance_rate"] * r["target_calls"] for r in runs) / calls,
            same_tokens=None if None in same else all(same), tau_per_prompt=[r["tau"] for r in runs])
    return dict(plain=dict(tokens_per_s=tokens / plain_s, seconds=plain_s), drafts=drafts)


def speculative_comparison(base, base_params, drafts: Dict[str, Tuple[Any, Any]], prompts: Sequence[np.ndarray],
                           config: M2R2Config, new_tokens: Optional[int] = None,
                           share_kv: Sequence[str] = ()) -> Dict[str, Any]:
    """Plain decoding of the base against speculative decoding with each draft, per temperature, over the
    prompts ((n, l) or n of (l_i,)), each decoded alone (batch 1) and pooled by `pool_prompt_timings`: tokens/s (compile
    excluded; runs interleaved; median of `repeats`: `bench speculative`'s `time_speculative`), acceptance,
    τ (and τ per prompt), greedy tokens == plain. The drafts named in `share_kv` draft over the base's KV
    caches."""
    import jax.numpy as jnp

    from experiments.bench_models.speculative import time_speculative

    modes = {}
    for temperature in config.temperature_list:
        timed = pool_prompt_timings([
            time_speculative(base, base_params, drafts, jnp.asarray(prompts[i])[None], new_tokens or config.new_tokens,
                             num_draft=config.num_draft, temperature=temperature, seed=config.seed + i,
                             repeats=config.repeats, share_kv=share_kv) for i in range(len(prompts))])
        rows = {"plain decoding": dict(tokens_per_s=timed["plain"]["tokens_per_s"], speedup=1.0)}
        for name, d in timed["drafts"].items():
            rows[name] = {k: d[k] for k in ("tokens_per_s", "speedup", "acceptance_rate", "tau", "tau_per_prompt",
                                            "target_calls", "same_tokens")}
        modes[f"T={temperature:g}"] = rows
    return modes


# ------------------------------------------------------------------------------------------------ experts
def expert_cost_model(hit_rates: Dict[int, float], shape: Dict[str, int]) -> Dict[str, Any]:
    """Decode latency (batch 1) per named chip with experts in host memory: on demand vs prefetched at each
    measured distance d (hit rate hit_rates[d]), from `offload_decode_latency`."""
    from mamba_jax.models.m2r2 import offload_decode_latency

    bpp, d = shape["bytes_per_param"], shape["d_model"]
    expert_bytes = 3 * d * shape["d_expert"] * bpp
    attention_bytes = d * (shape["q_heads"] + 2 * shape["kv_heads"]) * shape["head_dim"] * bpp \
        + shape["q_heads"] * shape["head_dim"] * d * bpp
    rows = {}
    for chip, (hbm, link) in CHIPS.items():
        layer_s = (attention_bytes + shape["k"] * expert_bytes) / hbm       # memory-bound decode of one layer
        common = dict(n_layers=shape["n_layers"], n_moe_layers=shape["n_layers"], layer_s=layer_s,
                      experts_needed=shape["k"], expert_bytes=expert_bytes, host_bandwidth=link)
        on_demand = offload_decode_latency(**common)
        resident = shape["n_layers"] * layer_s
        rows[chip] = dict(all_in_hbm_ms=resident * 1e3, on_demand_ms=on_demand * 1e3, prefetch_ms={
            str(dist): offload_decode_latency(**common, hit_rate=rate, prefetch_distance=int(dist)) * 1e3
            for dist, rate in hit_rates.items()})
    return dict(expert_mb=expert_bytes / 1e6, chips=rows)


def memory_kinds() -> List[str]:
    """The memory kinds this backend's first device addresses (e.g. device, pinned_host)."""
    import jax

    try:
        return sorted(m.kind for m in jax.devices()[0].addressable_memories())
    except Exception as error:   # an older or partial backend: say so in the results
        return [f"unavailable ({type(error).__name__})"]


def offloaded_decode_check(model, params, prompts: np.ndarray, steps: int = 16) -> Dict[str, Any]:
    """`offloaded_step` (experts in host memory, moved inside the step) against `step` on this machine:
    the largest logit difference over `steps` greedy steps and the median seconds per step of each."""
    import jax
    import jax.numpy as jnp

    from mamba_jax.inference import prefill, step
    from mamba_jax.inference.offload import expert_bytes, offload_experts, offloaded_step

    host = offload_experts(params)
    _, cache = prefill(model, params, jnp.asarray(prompts), max_len=prompts.shape[1] + steps)
    ids = jnp.asarray(prompts[:, -1])
    times = {"resident": [], "offloaded": []}
    diff = 0.0
    for _ in range(steps):
        outs = {}
        for name, fn, p in (("resident", step, params), ("offloaded", offloaded_step, host)):
            start = time.perf_counter()
            outs[name] = jax.block_until_ready(fn(model, p, ids, cache))
            times[name].append(time.perf_counter() - start)
        diff = max(diff, float(jnp.max(jnp.abs(outs["resident"][0] - outs["offloaded"][0]))))
        ids, cache = jnp.argmax(outs["resident"][0], -1).astype(jnp.int32), outs["resident"][1]
    return dict(expert_bytes=expert_bytes(params), max_abs_logit_difference=diff,
                **{f"{k}_ms": 1e3 * statistics.median(v[1:]) for k, v in times.items()})


def experts_stage(out: str, data: TextCorpus, vocab: int, config: M2R2Config) -> Dict[str, Any]:
    from mamba_jax.models.m2r2 import expert_prediction_hit_rates

    results = {}
    for unit in config.moe_units:
        tag = unit.replace(" ", "")
        model = moe_model(config, unit, vocab)
        params = train_lm(f"moe_{tag}", out, model, data, config.moe_steps, config.base_lr, config,
                          seed=config.seed + 3)
        rate = model.config.n_layer / config.moe_n_fast
        fast, fast_params, info = train_fast_stream(f"moe_{tag}_fast", out, model, params, config.moe_n_fast, rate,
                                                    data, config.moe_adapter_steps, config)
        per_batch = [expert_prediction_hit_rates(model, params, fast, fast_params, b["inputs"],
                                                 b["loss_mask"].astype(np.int32), shared_kv=config.shared_kv)
                     for b in data.eval_batches]
        rates = {s: {d: float(np.mean([r[s][d] for r in per_batch])) for d in per_batch[0][s]}
                 for s in ("slow", "fast")}
        results[unit] = dict(pattern=model.config.pattern, n_experts=config.n_experts, k=1,
                             chance=1.0 / config.n_experts, params=count_params(params), **info,
                             hit_rate={s: {str(d): v for d, v in r.items()} for s, r in rates.items()},
                             offloaded_decode=offloaded_decode_check(model, params,
                                                                     np.asarray(data.prompts(1, config.prompt_len))))
    first = next(iter(results.values()))
    best = {int(d): max(first["hit_rate"]["fast"].get(d, 0.0), first["hit_rate"]["slow"][d])
            for d in first["hit_rate"]["slow"]}
    return dict(models=results, memory_kinds=memory_kinds(),
                cost_model=dict(shape=MIXTRAL_SHAPE, hit_rates_from=next(iter(results)),
                                **expert_cost_model(best, MIXTRAL_SHAPE)))


# ------------------------------------------------------------------------------------------------ report
def claims_of(early: Dict[str, Any], spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    m2r2, dist = "M2R2 (fast stream, confidence)", "slow stream, distance-based"
    diffs = [(early["agreement_at_layers"][m2r2][L], early["agreement_at_layers"][dist][L])
             for L in early["agreement_at_layers"][m2r2]]
    diffs = [a - b for a, b in diffs if a is not None and b is not None]
    nll = [early.get("nll_at_layers", {}).get(m2r2, {}).get(L) for L in early["agreement_at_layers"][m2r2]]
    nll_dist = [early.get("nll_at_layers", {}).get(dist, {}).get(L) for L in early["agreement_at_layers"][m2r2]]
    nll_diffs = [a - b for a, b in zip(nll, nll_dist) if a is not None and b is not None]
    greedy = spec.get("T=0", {}).get("M2R2 self-speculative (fast stream)")
    claims = [dict(claim="M2R2 early exit above distance-based early exit at equal mean layers",
                   holds=bool(diffs) and min(diffs) > 0,
                   detail=f"agreement difference at {len(diffs)} budgets: " + ", ".join(f"{d:+.3f}" for d in diffs))]
    if nll_diffs:
        claims.append(dict(claim="M2R2 early exit below distance-based early exit in held-out NLL at equal mean "
                                 "layers", holds=max(nll_diffs) < 0,
                           detail="NLL difference: " + ", ".join(f"{d:+.3f}" for d in nll_diffs)))
    if greedy:
        claims.append(dict(claim="self-speculative decoding ≥ 2x plain decoding (greedy)", holds=greedy["speedup"] >= 2,
                           detail=f"{greedy['speedup']:.2f}x, τ {greedy['tau']:.2f}"))
    layerskip = "LayerSkip-style (first layers, no adapters)"
    taus = [(mode, per["M2R2 self-speculative (fast stream)"]["tau"], per[layerskip]["tau"])
            for mode, per in spec.items() if layerskip in per and "M2R2 self-speculative (fast stream)" in per]
    if taus:
        claims.append(dict(claim="the adapters lengthen the accepted drafts: τ of M2R2 above LayerSkip-style",
                           holds=all(a > b for _, a, b in taus),
                           detail=", ".join(f"{m}: {a:.2f} vs {b:.2f}" for m, a, b in taus)))
    return claims


def results_markdown(r: Dict[str, Any]) -> str:
    from mamba_jax.bench_utils import markdown_table

    e = r["early_exit"]
    lines = [f"# M2R2 ({r['preset']} preset) — {r['hardware']}", "",
             f"Base: {r['base']['description']}, {r['base']['params']:,} params, held-out NLL "
             f"{e['full_model_nll']:.3f} over {e['tokens']:,} tokens. Fast stream: {r['fast']['n_fast']} layers at "
             f"rate {r['fast']['rate']:g}, {r['fast']['adapter_params']:,} adapter params "
             f"({100 * r['fast']['adapter_params'] / r['base']['params']:.2f} % of the base); base weights "
             f"bitwise unchanged: {r['fast']['base_unchanged']}.", "",
             f"Wall clock: {r['elapsed_min']:.1f} min ("
             + ", ".join(f"{k} {v:.1f}" for k, v in r.get("stage_minutes", {}).items()) + ").", "",
             "## Early exit: agreement with the full model's greedy token at a mean-layer budget", ""]
    header = ["method"] + [f"{L:g} layers" for L in e["budgets"]]
    rows = [[name] + ["—" if v is None else v for v in at.values()] for name, at in e["agreement_at_layers"].items()]
    lines += [markdown_table(header, rows), ""]
    if "nll_at_layers" in e:
        lines += [f"Held-out NLL (nats / token; the full model: {e['full_model_nll']:.3f}) at the same budgets:", ""]
        rows = [[name] + ["—" if v is None else v for v in at.values()] for name, at in e["nll_at_layers"].items()]
        lines += [markdown_table(header, rows), ""]
    lines += ["## Self-speculative decoding", ""]
    rows = []
    for mode, per in r["speculative"].items():
        for name, d in per.items():
            per_prompt = d.get("tau_per_prompt")
            rows.append([mode, name, d["tokens_per_s"], d["speedup"], d.get("acceptance_rate", "—"),
                         d.get("tau", "—"), f"{min(per_prompt):.2f}–{max(per_prompt):.2f}" if per_prompt else "—",
                         "n/a" if d.get("same_tokens") is None else d["same_tokens"]])
    lines += [markdown_table(["temperature", "method", "tokens / s", "speed-up", "acceptance", "τ",
                              "τ per prompt", "tokens == plain"], rows), ""]
    x = r["experts"]
    if x is None:
        lines += ["## Expert prediction", "", "(skipped: `moe_patterns` is empty)", ""]
    else:
        lines += ["## Expert prediction: hit rate of layer j's experts predicted after i layers, per distance j − i", ""]
        rows = []
        for unit, m in x["models"].items():
            for d in m["hit_rate"]["slow"]:
                rows.append([unit, d, m["hit_rate"]["slow"][d],
                             m["hit_rate"]["fast"].get(d, "—"), m["chance"]])
        lines += [markdown_table(["unit", "distance", "slow residual h_i", "fast residual g_i (M2R2)", "chance"], rows), ""]
        cm = x["cost_model"]
        rows = [[unit, m["offloaded_decode"]["expert_bytes"], m["offloaded_decode"]["resident_ms"],
                 m["offloaded_decode"]["offloaded_ms"], m["offloaded_decode"]["max_abs_logit_difference"]]
                for unit, m in x["models"].items()]
        lines += ["Decode step with the experts in host memory (`inference.offload`, moved inside the step) on this "
                  "machine, batch 1:", "", markdown_table(["unit", "expert bytes", "resident (ms / step)",
                                                            "offloaded (ms / step)", "max |Δ logit|"], rows), ""]
        lines += [f"Cost model: {cm['shape']['n_layers']}-layer Mixtral-8x7B shape, {cm['expert_mb']:.0f} MB experts in "
                  f"host memory, batch 1, hit rates of the {cm['hit_rates_from']!r} model. Memory kinds here: "
                  f"{', '.join(x['memory_kinds'])}.", ""]
        dists = sorted({d for c in cm["chips"].values() for d in c["prefetch_ms"]}, key=int)
        rows = [[chip, c["all_in_hbm_ms"], c["on_demand_ms"]] + [c["prefetch_ms"][d] for d in dists]
                for chip, c in cm["chips"].items()]
        lines += [markdown_table(["chip", "all in HBM (ms)", "on demand (ms)"] + [f"prefetch d={d} (ms)" for d in dists],
                                 rows), ""]
    lines += ["## Claims", ""] + [f"- {'holds' if c['holds'] else 'does not hold'}: {c['claim']} ({c['detail']})"
                                  for c in r["claims"]]
    lines += ["", "## The paper (abstract; other models, tasks and hardware)", ""]
    lines += [f"- {k}: {v}" for k, v in r["m2r2_reported"].items()]
    lines += ["", "## Deviations", ""] + [f"- {d}" for d in r["deviations"]]
    return "\n".join(lines) + "\n"


def plot_results(r: Dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in r["early_exit"]["sweeps"].items():
        pts = sorted(points, key=lambda p: p["mean_layers"])
        for ax, key in zip(axes, ("agreement", "nll")):
            ax.plot([p["mean_layers"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=name)
    axes[0].set_ylabel("agreement with the full model's greedy token")
    axes[1].set_ylabel("held-out NLL (nats / token)")
    axes[1].axhline(r["early_exit"]["full_model_nll"], color="grey", ls=":", label="full model")
    for ax in axes:
        ax.set_xlabel("mean layers per token")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Early exit: quality vs layers run")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality_vs_layers.png"), dpi=120)
    plt.close(fig)

    modes = list(r["speculative"])
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        per = r["speculative"][mode]
        names = list(per)
        ax.bar(range(len(names)), [per[n]["tokens_per_s"] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=20, fontsize=7)
        for i, n in enumerate(names):
            if "tau" in per[n]:
                ax.text(i, per[n]["tokens_per_s"], f"τ {per[n]['tau']:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{mode}: tokens / s")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speculative.png"), dpi=120)
    plt.close(fig)

    if r["experts"] is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for unit, m in r["experts"]["models"].items():
        for stream, ls in (("slow", "--"), ("fast", "-")):
            d = sorted(m["hit_rate"][stream], key=int)
            ax.plot([int(x) for x in d], [m["hit_rate"][stream][x] for x in d], ls, marker="o",
                    label=f"{unit}: {stream} residual")
        ax.axhline(m["chance"], color="grey", ls=":")
    ax.set_xlabel("distance j − i (layers ahead)")
    ax.set_ylabel("expert hit rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "expert_hit_rate.png"), dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ run
def run(config: M2R2Config, out: str) -> Dict[str, Any]:
    from mamba_jax.bench_utils import hardware_description
    from mamba_jax.models.m2r2 import fast_stream, fast_stream_params, truncated_config

    import jax

    t0 = time.perf_counter()
    minutes: Dict[str, float] = {}   # wall-clock minutes per stage (a resumed stage: its loading only)

    def lap(stage: str) -> None:
        minutes[stage] = (time.perf_counter() - t0) / 60 - sum(minutes.values())

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)

    new_tokens = config.new_tokens
    if config.m1_run:
        base, base_params, m1 = load_m1_teacher(config.m1_run)
        vocab = base.config.vocab_size
        description = (f"the teacher of the m1 run {config.m1_run} ({base.config.n_layer} layers, d "
                       f"{base.config.d_model}), on its arithmetic task")
        new_tokens = m1.max_new_tokens
    elif config.base:
        from mamba_jax.interop import load_hf
        from mamba_jax.models import TransformerLM

        base, base_params = load_hf(config.base)
        if not isinstance(base, TransformerLM):
            raise ValueError(f"m2r2: `base` must be a Llama-style (TransformerLM) checkpoint; {config.base} holds a "
                             f"{type(base).__name__}")
        vocab = base.config.vocab_size
        description = f"{config.base} ({base.config.n_layer} layers, d {base.config.d_model})"
    else:
        vocab = config.bpe_vocab_size
        base, base_params = base_model(config, vocab), None
        description = (f"Llama-style Transformer, {config.n_layer} layers, d {config.d_model}, {config.n_heads} "
                       f"heads ({config.n_kv_heads} KV), trained {config.base_steps} steps here")
    if config.m1_run:
        data = ReasoningCorpus(m1, config.batch_size, config.eval_batches)
    else:
        data = TextCorpus(config, out, vocab)
        base_params = train_lm("base", out, base, data, config.base_steps, config.base_lr, config,
                               params=base_params, seed=config.seed)
    lap("base")
    n_layer = base.config.n_layer
    if not config.n_fast < n_layer:
        raise ValueError(f"m2r2: `n_fast` ({config.n_fast}) must be < the base's {n_layer} layers")
    rate = config.rate or n_layer / config.n_fast
    fast, fast_params, info = train_fast_stream("fast", out, base, base_params, config.n_fast, rate, data,
                                                config.adapter_steps, config)
    lap("fast")
    layerskip = fast_stream(base, config.n_fast, rank=0, rate=1.0)
    layerskip_params = fast_stream_params(layerskip, base_params, jax.random.PRNGKey(0))
    draft = type(base)(truncated_config(base.config, config.n_fast))   # the base's shape, n_fast layers
    draft_params = train_lm("draft", out, draft, data, config.draft_steps or config.base_steps, config.base_lr,
                            config, seed=config.seed + 1)
    lap("draft")

    print("early exit sweep ...", flush=True)
    early = early_exit_sweep(base, base_params, fast, fast_params, data.eval_batches, config)
    lap("early exit")
    print("speculative decoding ...", flush=True)
    prompts = data.prompts(config.n_prompts, config.prompt_len)
    spec = speculative_comparison(base, base_params, {
        "M2R2 self-speculative (fast stream)": (fast, fast_params),
        "LayerSkip-style (first layers, no adapters)": (layerskip, layerskip_params),
        "two-model (small Transformer draft)": (draft, draft_params)}, prompts, config, new_tokens,
        # LayerSkip reuses the early layers' cache (exact: its layers are the target's on the same residual)
        share_kv=("M2R2 self-speculative (fast stream)",) * config.shared_kv
        + ("LayerSkip-style (first layers, no adapters)",))
    lap("speculative")
    print("expert prediction ...", flush=True)
    experts = experts_stage(out, data, vocab, config) if config.moe_units else None
    lap("experts")

    results = {
        "experiment": "m2r2", "preset": config.preset, "config": config.to_dict(),
        "base": dict(description=description, params=count_params(base_params), n_layer=n_layer),
        "fast": dict(n_fast=config.n_fast, rate=rate, rank=config.adapter_rank, **info),
        "draft": dict(n_layer=config.n_fast, params=count_params(draft_params)),
        "early_exit": early, "speculative": spec, "experts": experts,
        "claims": claims_of(early, spec), "m2r2_reported": M2R2_REPORTED, "deviations": deviations(config),
        "hardware": hardware_description(), "elapsed_min": sum(minutes.values()),
        "stage_minutes": minutes,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = results_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plot_results(results, out)
    print(text)
    print(f"wrote {out}/results.md, results.json, quality_vs_layers.png, speculative.png"
          + (", expert_hit_rate.png" if experts else ""))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, out = parse_command_line([] if argv is None else argv)
    run(config, out)
    return 0
