"""`mamba-jax bench speculative`: speculative decoding against plain `generate` on the same target.

Random weights agree on nothing, so the benchmark first trains every model briefly on the same real text
(bytes of the Python standard library, `mamba_jax.data.text`, held-out files for the prompts): the target
(a Transformer by default, `--target`) and one small draft of each family (Transformer, Mamba, Mamba-2, an
"M A" hybrid). It then generates `--new-tokens` tokens after held-out prompts with the target alone
(`generate`) and with each draft (`speculative_generate`), at each of `--temperatures` (0: greedy, and the
tokens are checked identical to `generate`'s; > 0: sampled), and prints tokens/s (compile excluded; runs
interleaved; median of `--repeats`), the speed-up over plain `generate`, the acceptance rate and τ (tokens
gained per target call), and the start of the target's own continuation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Collection, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mamba_jax.bench_utils import hardware_description, markdown_table
from mamba_jax.models import (HybridConfig, HybridLM, Mamba2Config, Mamba2LM, MambaConfig, MambaLM, TransformerConfig,
                              TransformerLM, init_params)

FAMILIES = ("transformer", "mamba", "mamba2", "hybrid")


def build(family: str, vocab: int, d_model: int, n_layer: int):
    """A model of `family` at width `d_model` and depth `n_layer` (the hybrid: Mamba then attention, repeated)."""
    common = dict(vocab_size=vocab, d_model=d_model, n_layer=n_layer)
    attention = TransformerConfig(**common, n_heads=max(1, d_model // 32))
    if family == "transformer":
        return TransformerLM(attention)
    if family == "mamba":
        return MambaLM(MambaConfig(**common))
    if family == "mamba2":
        return Mamba2LM(Mamba2Config(**common, head_dim=min(64, d_model // 2), d_state=32))
    pattern = " ".join("M" if i % 2 == 0 else "A" for i in range(n_layer))
    return HybridLM(HybridConfig(pattern=pattern, **{**common, "n_layer": None}, attention=attention,
                                 mamba=MambaConfig(**common)))


class TextWindows:
    """Random windows of the byte-tokenised standard library: train files for training, held-out files
    for prompts (split by a stable hash of each file's path)."""

    def __init__(self, max_files: int, seed: int):
        from mamba_jax.data.text import ByteTokenizer, default_text_root, read_documents, split_of, text_files

        root = default_text_root()
        paths = text_files(root, "*.py", max_files)
        self.tok = ByteTokenizer()
        split = {"train": [], "eval": []}
        for path, text in zip(paths, read_documents(paths)):
            split[split_of(os.path.relpath(path, root), 0.1)].append(self.tok.encode(text))
        if not split["eval"]:
            split["eval"].append(split["train"].pop())
        self.streams = {k: np.concatenate(v) for k, v in split.items()}
        self.rng = np.random.default_rng(seed)

    def windows(self, split: str, batch: int, length: int) -> np.ndarray:
        stream = self.streams[split]
        starts = self.rng.integers(0, len(stream) - length, batch)
        return np.stack([stream[s:s + length] for s in starts]).astype(np.int32)


def train(model, data: TextWindows, steps: int, batch: int, seq_len: int, lr: float, seed: int, desc: str):
    """(params, final train loss): AdamW with warmup and cosine decay on next-byte prediction."""
    from mamba_jax.train.optim import OptimizerConfig, make_optimizer
    from mamba_jax.train.step import create_train_state, make_train_step

    params = init_params(model, jax.random.PRNGKey(seed))
    opt = OptimizerConfig(learning_rate=lr, warmup_steps=min(50, steps // 5), total_steps=steps)
    state = create_train_state(model.apply, params, make_optimizer(opt))
    step = make_train_step()
    loss = float("nan")
    for _ in tqdm(range(steps), desc=desc, leave=False):
        w = data.windows("train", batch, seq_len + 1)
        state, metrics = step(state, dict(inputs=jnp.asarray(w[:, :-1]), targets=jnp.asarray(w[:, 1:]),
                                          loss_mask=jnp.ones((batch, seq_len), bool)))
        loss = metrics["loss"]
    return state.params, float(loss)


def time_speculative(target, target_params, drafts: Dict[str, Tuple[Any, Any]], prompt, new_tokens: int, *,
                     num_draft: int, temperature: float, seed: int, repeats: int, desc: Optional[str] = None,
                     share_kv: Collection[str] = ()) -> Dict:
    """Plain `generate` of the target against `speculative_generate` with each draft (drafts: {name: (model,
    params)}) on the same prompt (b, l) at one temperature: every run compiled first (its tokens kept),
    then `repeats` timed rounds with the runs interleaved, median seconds (compile excluded). The drafts named
    in `share_kv` draft over the target's KV caches (`speculative_generate(..., share_kv=True)`).

    Returns {"plain": {tokens_per_s, seconds, tokens (b, l + new_tokens)}, "drafts": {name: {tokens_per_s,
    seconds, speedup (plain seconds / its seconds), acceptance_rate, tau, target_calls, same_tokens}}};
    same_tokens: greedy output identical to plain `generate`'s (None when sampled: another draw)."""
    from mamba_jax.inference import generate, speculative_generate

    kw = dict(temperature=temperature, rng=jax.random.PRNGKey(seed))
    runs = {None: lambda: generate(target, target_params, prompt, new_tokens, **kw)}
    for name, (model, params) in drafts.items():
        # every name bound now: a lambda reading the loop's `name` later would share (or not) by the last draft's
        runs[name] = (lambda m=model, p=params, s=name in share_kv: speculative_generate(
            target, target_params, m, p, prompt, new_tokens, num_draft=num_draft, share_kv=s, **kw))
    outputs = {name: fn() for name, fn in runs.items()}                        # compiles
    times = {name: [] for name in runs}
    for _ in tqdm(range(repeats), desc=desc, disable=desc is None):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    tokens = int(prompt.shape[0]) * new_tokens
    plain_s = statistics.median(times[None])
    plain = np.asarray(outputs[None])
    result = dict(plain=dict(tokens_per_s=tokens / plain_s, seconds=plain_s, tokens=plain), drafts={})
    for name in drafts:
        out, stats = outputs[name]
        seconds = statistics.median(times[name])
        result["drafts"][name] = dict(
            tokens_per_s=tokens / seconds, seconds=seconds, speedup=plain_s / seconds,
            acceptance_rate=stats.acceptance_rate, tau=stats.mean_accepted_length, target_calls=stats.target_calls,
            same_tokens=bool(np.array_equal(np.asarray(out), plain)) if temperature == 0 else None)
    return result


def bench(args) -> Dict:

    data = TextWindows(args.max_files, args.seed)
    vocab = data.tok.vocab_size
    target = build(args.target, vocab, args.target_d_model, args.target_n_layer)
    t_params, t_loss = train(target, data, args.train_steps, args.batch_size, args.seq_len, args.lr, args.seed,
                             f"train target ({args.target})")
    drafts = {}
    for family in args.drafts:
        model = build(family, vocab, args.draft_d_model, args.draft_n_layer)
        params, loss = train(model, data, args.train_steps, args.batch_size, args.seq_len, args.lr, args.seed + 1,
                             f"train draft ({family})")
        drafts[family] = (model, params, loss)
    count = lambda p: int(sum(np.size(x) for x in jax.tree_util.tree_leaves(p)))   # noqa: E731
    prompt = jnp.asarray(data.windows("eval", args.batch, args.prompt_len))
    n = args.new_tokens
    results = dict(target=dict(family=args.target, params=count(t_params), train_loss=t_loss), modes={})
    for temperature in args.temperatures:
        timed = time_speculative(target, t_params, {f: (m, p) for f, (m, p, _) in drafts.items()}, prompt, n,
                                 num_draft=args.num_draft, temperature=temperature, seed=args.seed,
                                 repeats=args.repeats, desc=f"timed runs, temperature {temperature}")
        plain = timed["plain"]
        mode = results["modes"][f"T={temperature:g}"] = dict(
            plain=dict(tokens_per_s=plain["tokens_per_s"], seconds=plain["seconds"],
                       sample=data.tok.decode(plain["tokens"][0])), drafts={})
        for family, (model, params, loss) in drafts.items():
            mode["drafts"][family] = dict(params=count(params), train_loss=loss, **timed["drafts"][family])
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-jax bench speculative", description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=FAMILIES, default="transformer")
    parser.add_argument("--drafts", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--target-d-model", type=int, default=256)
    parser.add_argument("--target-n-layer", type=int, default=6)
    parser.add_argument("--draft-d-model", type=int, default=64)
    parser.add_argument("--draft-n-layer", type=int, default=2)
    parser.add_argument("--num-draft", type=int, default=4, help="draft tokens per target call")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-files", type=int, default=400, help="standard-library files read")
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", default="0,1",
                        help="comma-separated; 0 is greedy (checked equal to generate), > 0 samples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="results/bench_speculative")
    args = parser.parse_args(argv)
    args.drafts = [x.strip() for x in args.drafts.split(",") if x.strip()]
    try:
        args.temperatures = [float(x) for x in args.temperatures.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--temperatures: expected comma-separated numbers; got {args.temperatures!r}")
    if not args.temperatures or min(args.temperatures) < 0:
        parser.error(f"--temperatures: expected numbers >= 0; got {args.temperatures}")
    bad = sorted(set(args.drafts) - set(FAMILIES))
    if bad or not args.drafts:
        parser.error(f"--drafts: unknown family {bad}; choose from {FAMILIES}")
    for name in ("target_d_model", "target_n_layer", "draft_d_model", "draft_n_layer", "num_draft", "train_steps",
                 "batch_size", "seq_len", "max_files", "batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    results = bench(args)
    t = results["target"]
    print(f"speculative decoding benchmark: target {t['family']} d_model {args.target_d_model} x "
          f"{args.target_n_layer} ({t['params']:,} params, train loss {t['train_loss']:.2f}); drafts d_model "
          f"{args.draft_d_model} x {args.draft_n_layer}; {args.train_steps} training steps each on standard-library "
          f"bytes; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, num_draft "
          f"{args.num_draft}, float32, median of {args.repeats} interleaved runs, compile excluded")
    print(hardware_description())
    rows = []
    for mode, r in results["modes"].items():
        rows.append([mode, "(none: plain generate)", "", "", r["plain"]["tokens_per_s"], 1.0, "", "", "", ""])
        rows += [[mode, f, d["params"], d["train_loss"], d["tokens_per_s"], d["speedup"], d["acceptance_rate"],
                  d["tau"], d["target_calls"], "n/a (sampled)" if d["same_tokens"] is None else d["same_tokens"]]
                 for f, d in r["drafts"].items()]
    print(markdown_table(["temperature", "draft", "draft params", "draft train loss", "tokens / s", "speed-up",
                          "acceptance", "τ", "target calls", "tokens == generate"], rows))
    for mode, r in results["modes"].items():
        print(f"target alone, {mode}, first row: {r['plain']['sample'][:120]!r}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(dict(hardware=hardware_description(), config=vars(args), results=results), f, indent=1)
    print(f"wrote {args.out_dir}/results.json")
    if any(d["same_tokens"] is False for r in results["modes"].values() for d in r["drafts"].values()):
        print("ERROR: a speculative run did not reproduce greedy generate's tokens")
        return 1
    return 0
