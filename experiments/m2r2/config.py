"""Configuration of the `m2r2` experiment (Bhendawade et al., "M2R2: Mixture of Multi-Rate Residuals for
Efficient Transformer Inference", arXiv 2502.02040): a fast residual stream with low-rank accelerator
adapters over a frozen base model (`mamba_jax.models.m2r2`), evaluated for early exit, self-speculative
decoding and ahead-of-time MoE expert loading on held-out text (the standard library's Python sources,
BPE) — the paper's chat benchmarks (MT-Bench, ...) are not reachable offline.

One flat frozen dataclass (``key=value`` overrides through `experiments.lm.config.apply_overrides`), three
presets: ``smoke`` (the tests: seconds), ``cpu`` (the default: ≤ 45 minutes on 2 cores) and ``paper``
(an HF Llama checkpoint as the base with `base=<folder>`; GPU scale).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

PRESETS = ("smoke", "cpu", "paper")


@dataclasses.dataclass(frozen=True)
class M2R2Config:
    """Every knob of one run; the defaults are the `cpu` preset.

    Stages (each resumable from its checkpoint folder):
      base — a Llama-style TransformerLM trained on the text (`base_steps`), or an HF Llama checkpoint
        (`base` = its folder with tokenizer.json; `base_steps` then fine-tunes it, 0 = as is), or the
        teacher of an `mamba-jax run m1` folder (`m1_run`; the data is then M1's arithmetic task: training
        rows of its training problems, held-out rows and prompts of its held-out problems);
      fast — the fast stream: the base's first `n_fast` layers at rate `rate` (0: n_layer / n_fast) with
        adapters of rank `adapter_rank`, trained `adapter_steps` on alignment + KL, base weights frozen;
        `shared_kv` (default, M2R2): its attention reads the base's KV cache for earlier tokens, in training,
        early exit and self-speculative decoding alike; False: its own caches;
      draft — the two-model speculative baseline: a TransformerLM of `n_fast` layers at the base's width
        (the fast stream's cost per token), trained like the base for `draft_steps` (0: base_steps);
      moe — for each pattern of `moe_patterns` ("A E": a Transformer with Switch-MoE feed-forward layers;
        "M E": MoE-Mamba), a model of `moe_n_layer` layers trained `moe_steps`, and its fast stream
        (`moe_n_fast` layers, `moe_adapter_steps`), for the expert-prediction hit rates.
    Evaluation on `eval_batches` × `batch_size` held-out rows: early exit (quality vs mean layers), skip
    decoding, self-speculative decoding of `new_tokens` after each of `n_prompts` held-out prompts of
    `prompt_len` tokens at each of `temperatures` (median of `repeats` timed runs), expert hit rates and the
    offload cost model.
    """

    preset: str = "cpu"
    seed: int = 0
    # -- text (mamba_jax.data.text; BPE trained on the train split's files) --
    text_max_files: int = 400
    seq_len: int = 128
    bpe_vocab_size: int = 1024
    batch_size: int = 16
    eval_batches: int = 4
    # -- base: Llama-style Transformer --
    base: str = ""
    m1_run: str = ""                  # or the teacher of a `mamba-jax run m1` folder, on its arithmetic task
    d_model: int = 256
    n_layer: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    d_intermediate: int = 512
    base_steps: int = 1000
    base_lr: float = 2e-3
    # -- fast stream --
    n_fast: int = 4
    rate: float = 0.0                 # 0: n_layer / n_fast
    adapter_rank: int = 16
    adapter_steps: int = 400
    adapter_lr: float = 3e-3
    align_weight: float = 1.0
    kl_weight: float = 1.0
    shared_kv: bool = True            # the fast stream reads the slow stream's KV cache (M2R2); False: its own
    # -- two-model speculative baseline --
    draft_steps: int = 0              # 0: base_steps
    # -- early exit and skip decoding --
    exit_thresholds: int = 24         # thresholds swept per method (quantiles of its scores)
    skip_warmup_layers: int = 1       # SkipDecode: lowest layers every token runs
    # -- self-speculative decoding --
    prompt_len: int = 64
    n_prompts: int = 8                # held-out prompts, each decoded alone (batch 1); τ and tokens/s pool them
    new_tokens: int = 128
    num_draft: int = 4
    temperatures: str = "0,1"
    repeats: int = 3
    # -- MoE: expert prediction --
    moe_patterns: str = "A E,M E"      # comma-separated repeating units ("": skip the expert stage)
    moe_d_model: int = 128
    moe_n_layer: int = 8
    n_experts: int = 8
    moe_steps: int = 300
    moe_n_fast: int = 4
    moe_adapter_steps: int = 100
    # -- optimisation and loop --
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"M2R2Config: `preset` must be one of {PRESETS}; got {self.preset!r}")
        for name in ("text_max_files", "seq_len", "batch_size", "eval_batches", "d_model", "n_layer", "n_heads",
                     "n_kv_heads", "n_fast", "exit_thresholds", "prompt_len", "n_prompts", "new_tokens", "num_draft",
                     "repeats", "moe_d_model", "moe_n_layer", "n_experts", "moe_n_fast", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"M2R2Config: `{name}` must be a positive int; got {value!r}")
        for name in ("base_steps", "adapter_steps", "draft_steps", "moe_steps", "moe_adapter_steps", "adapter_rank",
                     "skip_warmup_layers", "d_intermediate", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"M2R2Config: `{name}` must be an int >= 0; got {value!r}")
        if not self.n_fast < self.n_layer:
            raise ValueError(f"M2R2Config: `n_fast` ({self.n_fast}) must be < `n_layer` ({self.n_layer})")
        if not self.moe_n_fast < self.moe_n_layer:
            raise ValueError(f"M2R2Config: `moe_n_fast` ({self.moe_n_fast}) must be < `moe_n_layer` "
                             f"({self.moe_n_layer})")
        if self.base and self.m1_run:
            raise ValueError("M2R2Config: set at most one of `base` (an HF checkpoint) and `m1_run` (an m1 run folder)")
        if self.rate < 0:
            raise ValueError(f"M2R2Config: `rate` must be >= 0 (0: n_layer / n_fast); got {self.rate}")
        if self.skip_warmup_layers > self.n_layer:
            raise ValueError(f"M2R2Config: `skip_warmup_layers` ({self.skip_warmup_layers}) must be <= n_layer "
                             f"({self.n_layer})")
        if self.prompt_len >= self.seq_len:
            raise ValueError(f"M2R2Config: `prompt_len` ({self.prompt_len}) must be < `seq_len` ({self.seq_len}): "
                             "prompts are cut from held-out rows")
        try:
            temps = self.temperature_list
        except ValueError:
            raise ValueError(f"M2R2Config: `temperatures` must be comma-separated numbers; got "
                             f"{self.temperatures!r}") from None
        if not temps or min(temps) < 0:
            raise ValueError(f"M2R2Config: `temperatures` must be numbers >= 0 (0: greedy); got {self.temperatures!r}")
        for unit in self.moe_units:
            kinds = unit.split()
            if "E" not in kinds or not set(kinds) <= {"A", "M", "M2", "E"} or self.moe_n_layer % len(kinds):
                raise ValueError(f"M2R2Config: each of `moe_patterns` must be a unit of A / M / M2 / E layers with an "
                                 f"E whose length divides moe_n_layer ({self.moe_n_layer}); got {unit!r}")

    @property
    def temperature_list(self) -> Tuple[float, ...]:
        return tuple(float(x) for x in self.temperatures.split(",") if x.strip())

    @property
    def moe_units(self) -> Tuple[str, ...]:
        return tuple(x.strip() for x in self.moe_patterns.split(",") if x.strip())

    @property
    def fast_rate(self) -> float:
        return self.rate or self.n_layer / self.n_fast

    def to_dict(self):
        return dataclasses.asdict(self)


def preset_config(preset: str = "cpu") -> M2R2Config:
    if preset == "cpu":
        return M2R2Config()
    if preset == "smoke":
        return M2R2Config(preset="smoke", text_max_files=40, seq_len=48, bpe_vocab_size=300, batch_size=8,
                          eval_batches=1, d_model=32, n_layer=4, n_heads=2, n_kv_heads=1, d_intermediate=64,
                          base_steps=30, n_fast=2, adapter_rank=4, adapter_steps=20, exit_thresholds=6, prompt_len=16,
                          n_prompts=2, new_tokens=12, num_draft=3, temperatures="0", repeats=1, moe_patterns="A E",
                          moe_d_model=32, moe_n_layer=4, n_experts=4, moe_steps=20, moe_n_fast=2, moe_adapter_steps=10,
                          warmup_steps=3, log_every=10, progress=False)
    if preset == "paper":
        # the base is an HF Llama checkpoint (`base=<folder>`); the fast stream at a quarter of its depth
        return M2R2Config(preset="paper", text_max_files=100_000, seq_len=1024, bpe_vocab_size=32_000,
                          batch_size=32, eval_batches=32, d_model=2048, n_layer=16, n_heads=32, n_kv_heads=8,
                          d_intermediate=8192, base_steps=0, n_fast=4, adapter_rank=64, adapter_steps=20_000,
                          adapter_lr=1e-4, prompt_len=256, new_tokens=256, repeats=5, moe_d_model=1024,
                          moe_n_layer=16, moe_steps=20_000, moe_n_fast=4, moe_adapter_steps=5_000)
    raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
