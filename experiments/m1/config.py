"""Configuration of the `m1` experiment (Wang et al., "M1: Towards Scalable Test-Time Compute with Mamba
Reasoning Models", arXiv 2504.10449; code jxiw/M1): a Llama-style Transformer teacher, a hybrid student
whose Mamba layers are initialised from the teacher's attention, reverse-KL distillation, SFT, GRPO with
a binary verifiable reward, and pass@1 / maj@k evaluation — on procedurally generated arithmetic
(`mamba_jax.data.reasoning`), which works offline.

One flat frozen dataclass (``key=value`` overrides through `experiments.lm.config.apply_overrides`), three
presets: ``smoke`` (the tests: seconds), ``cpu`` (the default: the whole pipeline on 2 cores) and ``paper``
(M1's shapes: a Llama-3.2-3B-shaped teacher and a 28-layer hybrid; a TPU/GPU job).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

from mamba_jax.data.reasoning import ArithmeticTask

PRESETS = ("smoke", "cpu", "paper")
MAMBA_FORMS = ("mamba1", "mamba2")


def m1_attention_layers(n_layer: int) -> Tuple[int, ...]:
    """M1's placement of the attention layers the hybrid keeps, scaled to `n_layer`: every fifth layer
    from layer 3, and the last — for 28 layers exactly M1's 3, 8, 13, 18, 23, 27."""
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"m1_attention_layers: `n_layer` must be a positive int; got {n_layer!r}")
    return tuple(sorted({i for i in range(n_layer) if i % 5 == 3} | {n_layer - 1}))


@dataclasses.dataclass(frozen=True)
class M1Config:
    """Every knob of one run; the defaults are the `cpu` preset.

    Stages (each resumable, each evaluated on the same held-out problems):
      teacher — TransformerLM trained by cross-entropy on the completions (`teacher_steps`);
      distill — the hybrid student (attention kept at `attention_layers`, default `m1_attention_layers`;
        Mamba layers from the teacher's attention in `mamba_form`), reverse KL(student ‖ teacher) at T = 1
        on completion tokens, the teacher run live, every parameter trained (M1's stage);
      sft — cross-entropy on completions;
      grpo — `grpo_iterations` rollouts of `grpo_prompts` prompts × `group_size` samples at
        `rollout_temperature`, `updates_per_rollout` optimiser steps each (M1: G = 8, T = 0.9, two steps,
        clip 0.2, entropy 0.01, no KL, gradient clip 1.0).
    Evaluation: greedy pass@1, pass@1 as the mean over `eval_samples` samples at `eval_temperature`, and
    maj@k for k in `maj_ks` (majority vote over k samples, averaged over the eval_samples // k disjoint
    groups), on `n_eval` distinct held-out problems.
    Fixed time (M1's self-consistency at equal wall-clock): the teacher and the first GRPO seed's student each
    sample `time_pool` completions per held-out problem and time their batched generation; each of
    `time_budgets` budgets (seconds of generation per problem, log grid) buys each model the samples its
    throughput allows, and maj@k is estimated by resampling the pool.
    """

    preset: str = "cpu"
    seed: int = 0
    # -- task (mamba_jax.data.reasoning.ArithmeticTask) --
    min_terms: int = 2
    max_terms: int = 4
    max_digits: int = 3                   # cpu: the teacher's greedy pass@1 0.66 (2 digits: 0.86, no headroom for RL)
    product_prob: float = 0.0
    product_digits: int = 1
    n_train: int = 40_000                 # training problems (SFT / distillation rows)
    n_eval: int = 256                     # distinct held-out problems
    # -- teacher: a Llama-style Transformer, trained here, or an HF Llama checkpoint (`teacher` = its folder,
    #    with tokenizer.json: its tokenizer then encodes the problems; teacher_steps fine-tunes it, 0 = as is)
    teacher: str = ""
    d_model: int = 128
    n_layer: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_intermediate: int = 256             # 0: Llama's width (8/3 · d_model, rounded up to 256)
    teacher_steps: int = 2000
    teacher_lr: float = 2e-3
    # -- student --
    mamba_form: str = "mamba1"            # mamba1 (M1) | mamba2
    d_state: int = 16
    attention_layers: str = ""            # comma-separated; "": m1_attention_layers(n_layer)
    # what the Mamba layers take from the teacher beyond x ← V, B ← K, C ← Q, out ← O (`attention_to_mamba1`'s
    # options): "fresh" keeps the fresh Mamba init of the conv, Δ, A, D and gate, as MambaInLlama / M1 do.
    # Measured (cpu preset, 400 distillation steps): reverse KL 0.76 with all three "fresh", 3.63 with
    # identity / linear_attention / open; each alone "fresh" helps less (300 steps: ssm 2.03, conv 3.35).
    conv_init: str = "fresh"              # fresh | identity
    ssm_init: str = "fresh"               # fresh | linear_attention
    gate_init: str = "fresh"              # fresh | open
    distill_steps: int = 1500             # cpu: reverse KL levels off near 0.6 by step 1,000 (2 digits)
    distill_lr: float = 2e-3
    sft_steps: int = 1000                 # cpu: 500 left the student at 0.89 of the teacher (loss still falling)
    sft_lr: float = 3e-4
    # -- GRPO --
    grpo_iterations: int = 100
    grpo_prompts: int = 32                # prompts per rollout batch
    group_size: int = 8
    rollout_temperature: float = 0.9
    grpo_lr: float = 3e-5                 # cpu: 1e-5 left the policy unchanged; 5e-5 (150 its) and 1e-4 degraded it
    updates_per_rollout: int = 2
    clip_eps: float = 0.2
    entropy_coef: float = 0.01
    kl_coef: float = 0.0
    grpo_eval_every: int = 25             # iterations between held-out greedy evaluations
    grpo_seeds: str = "0,1"               # one GRPO run from the SFT student per seed (its prompts and samples)
    # -- optimisation of the supervised stages --
    batch_size: int = 32
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    # -- evaluation --
    eval_samples: int = 16
    eval_temperature: float = 0.7
    maj_ks: str = "1,4,16"
    eval_batch_size: int = 512            # rows per generation call
    time_pool: int = 32                   # fixed-time stage: samples drawn per problem by each model
    time_budgets: int = 12                # fixed-time stage: budgets on a log grid
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"M1Config: `preset` must be one of {PRESETS}; got {self.preset!r}")
        if self.mamba_form not in MAMBA_FORMS:
            raise ValueError(f"M1Config: `mamba_form` must be one of {MAMBA_FORMS}; got {self.mamba_form!r}")
        if isinstance(self.teacher_steps, bool) or not isinstance(self.teacher_steps, int) or self.teacher_steps < 0:
            raise ValueError(f"M1Config: `teacher_steps` must be an int >= 0; got {self.teacher_steps!r}")
        if not self.teacher and self.teacher_steps == 0:
            raise ValueError("M1Config: `teacher_steps`=0 needs a trained `teacher` checkpoint folder")
        for name in ("n_train", "n_eval", "d_model", "n_layer", "n_heads", "n_kv_heads",
                     "distill_steps", "sft_steps", "grpo_iterations", "grpo_prompts", "group_size",
                     "updates_per_rollout", "grpo_eval_every", "batch_size", "eval_samples", "eval_batch_size",
                     "log_every", "d_state", "time_pool", "time_budgets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"M1Config: `{name}` must be a positive int; got {value!r}")
        if self.grpo_prompts % self.updates_per_rollout:
            raise ValueError(f"M1Config: `grpo_prompts` ({self.grpo_prompts}) must split into `updates_per_rollout` "
                             f"({self.updates_per_rollout}) mini-batches of whole groups")
        bad = [k for k in self.ks if k > self.eval_samples]
        if bad:
            raise ValueError(f"M1Config: `maj_ks` {bad} exceed `eval_samples`={self.eval_samples}")
        from mamba_jax.distill.attention_init import CONV_INITS, GATE_INITS, SSM_INITS

        for name, allowed in (("conv_init", CONV_INITS), ("ssm_init", SSM_INITS), ("gate_init", GATE_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"M1Config: `{name}` must be one of {allowed}; got {getattr(self, name)!r}")
        self.task      # validates the task knobs
        self.seeds
        if self.attention_layers:
            layers = self.kept_attention
            if layers[-1] >= self.n_layer or layers[0] < 0:
                raise ValueError(f"M1Config: `attention_layers` must lie in [0, n_layer={self.n_layer}); got "
                                 f"{self.attention_layers!r}")

    @property
    def task(self) -> ArithmeticTask:
        return ArithmeticTask(min_terms=self.min_terms, max_terms=self.max_terms, max_digits=self.max_digits,
                              product_prob=self.product_prob, product_digits=self.product_digits)

    @property
    def ks(self) -> Tuple[int, ...]:
        try:
            ks = tuple(int(k) for k in self.maj_ks.split(",") if k.strip())
        except ValueError:
            raise ValueError(f"M1Config: `maj_ks` must be comma-separated ints; got {self.maj_ks!r}") from None
        if not ks or min(ks) < 1:
            raise ValueError(f"M1Config: `maj_ks` must hold positive ints; got {self.maj_ks!r}")
        return ks

    @property
    def seeds(self) -> Tuple[int, ...]:
        try:
            seeds = tuple(int(s) for s in self.grpo_seeds.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"M1Config: `grpo_seeds` must be comma-separated ints; got {self.grpo_seeds!r}") from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError(f"M1Config: `grpo_seeds` must hold distinct ints >= 0; got {self.grpo_seeds!r}")
        return seeds

    @property
    def kept_attention(self) -> Tuple[int, ...]:
        """The student's attention layers (the rest become Mamba layers)."""
        if not self.attention_layers:
            return m1_attention_layers(self.n_layer)
        try:
            return tuple(sorted({int(i) for i in self.attention_layers.split(",") if i.strip()}))
        except ValueError:
            raise ValueError(f"M1Config: `attention_layers` must be comma-separated ints; got "
                             f"{self.attention_layers!r}") from None

    @property
    def replaced_layers(self) -> Tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if i not in self.kept_attention)

    @property
    def seq_len(self) -> int:
        """Row length of the supervised stages: BOS + the longest prompt + completion, rounded up to 8."""
        n = 1 + self.task.max_prompt_chars + self.task.max_completion_chars
        return -(-n // 8) * 8

    @property
    def max_new_tokens(self) -> int:
        """Generation budget: the longest completion and its EOS."""
        return self.task.max_completion_chars + 1

    def to_dict(self):
        return dataclasses.asdict(self)


def preset_config(preset: str = "cpu") -> M1Config:
    if preset == "cpu":
        return M1Config()
    if preset == "smoke":
        return M1Config(preset="smoke", max_terms=3, max_digits=1, n_train=512, n_eval=16, d_model=32, n_layer=2,
                        n_heads=2, n_kv_heads=1, d_intermediate=64, d_state=8, teacher_steps=20, distill_steps=10,
                        sft_steps=10, grpo_iterations=4, grpo_prompts=4, group_size=4, grpo_eval_every=2,
                        batch_size=8, warmup_steps=2, eval_samples=4, maj_ks="1,4", eval_batch_size=64,
                        time_pool=4, time_budgets=4, log_every=5, progress=False, teacher_lr=3e-3, grpo_lr=1e-4, grpo_seeds="0")
    if preset == "paper":
        # Llama-3.2-3B's shape (28 layers, d 3072, 24 heads of 128, 8 KV heads, MLP 8192) with M1's placement
        return M1Config(preset="paper", max_terms=6, max_digits=3, product_prob=0.3, product_digits=2,
                        n_train=1_000_000, n_eval=500, d_model=3072, n_layer=28, n_heads=24, n_kv_heads=8,
                        d_intermediate=8192, teacher_steps=20_000, distill_steps=10_000, sft_steps=5_000,
                        grpo_iterations=500, grpo_prompts=128, batch_size=64, eval_samples=64, maj_ks="1,4,16,64", time_pool=64,
                        teacher_lr=3e-4, distill_lr=1e-5, sft_lr=1e-5, grpo_lr=1e-6)
    raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
