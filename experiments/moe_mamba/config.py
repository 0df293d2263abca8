"""Configuration of the `moe_mamba` experiment (Pióro et al., "MoE-Mamba", arXiv 2401.04081): plain Mamba
against MoE-Mamba with the same active parameters per token, on byte-level text, plus ablation arms.

One flat frozen dataclass (``key=value`` overrides through `experiments.lm.config.apply_overrides`), three
presets:

* ``smoke`` — seconds; tiny models, a few steps, two arms (mamba, moe); used by the tests.
* ``cpu``   — the default: every ablation arm at a small width, sized for ≤ 45 minutes on a 2-core CPU.
              A toy scale (a ~0.1M-parameter Mamba, a few hundred steps): it shows the pipeline and the
              direction of the effect, not the paper's numbers.
* ``cpu_long`` — the paper's protocol at CPU scale (≤ 60 minutes on 2 cores): arms mamba, moe_e1, moe_e4,
              moe (8 experts), moe_e16, moe_e32 on BPE tokens of the whole corpus, lr 1e-3, gradient clip 0.5,
              routing over the whole batch, experts sized so every arm has Mamba's active parameters, 2 seeds.
* ``paper`` — the paper's model sizes (`setting` "25m" or "100m" of `PAPER_SETTINGS`): a GPU/TPU job.

Arms (`arms`, comma-separated, run in that order, all on the same batches from the same seed):

* ``mamba`` — the dense baseline: `mamba_baseline_config` (2·n_blocks Mamba layers, same width).
* ``moe`` — MoE-Mamba: n_blocks × (Mamba, MoE) with `n_experts`, `router`, `capacity_factor`.
* ``moe_e<N>`` — as ``moe`` with N experts (``moe_e1``: one expert, a dense FFN of the same active size).
* ``moe_top2`` — top-2 routing (gates renormalised over the two experts: twice the active expert weights).
* ``moe_cf<X>`` — capacity factor X (e.g. ``moe_cf0.5``, ``moe_cf2``).
* ``moe_parallel`` — Mamba and MoE side by side in each block, h += Mamba(norm(h)) + MoE(norm(h)).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Tuple

from experiments.lm.config import LMConfig
from mamba_jax.layers.config import BaseLMConfig
from mamba_jax.models.moe_mamba import PAPER_SETTINGS, mamba_baseline_config, moe_mamba_config

PRESETS = ("smoke", "cpu", "cpu_long", "paper")
ROUTER_NAMES = ("switch", "topk")
ROUTINGS = ("batch", "sequence")   # expert choice is not causal: refused in language models
ARM_FORMS = ("mamba", "moe", "moe_e<N>", "moe_top2", "moe_cf<X>", "moe_parallel")
BASELINE = "mamba"
E1_CONTROL = "moe_e1"   # one expert: a dense FFN in place of every MoE layer, the control MoE must beat too


def arm_settings(arm: str) -> Dict[str, Any]:
    """The MoE settings an arm changes from the main ``moe`` arm ({} for ``moe``; ``{"baseline": True}`` for
    ``mamba``). Raises ValueError naming the valid arm forms.

    >>> arm_settings("moe_e16"), arm_settings("moe_cf0.5")
    ({'n_experts': 16}, {'capacity_factor': 0.5})
    """
    if arm == BASELINE:
        return {"baseline": True}
    if arm == "moe":
        return {}
    if arm == "moe_top2":
        return {"router": "topk"}
    if arm == "moe_expert_choice":
        raise ValueError("MoEMambaConfig: the arm 'moe_expert_choice' was removed: expert-choice routing picks "
                         "each expert's tokens over the whole sequence, later tokens included, so it is not a "
                         "valid causal language model (its 0.87x was a leak from the future)")
    if arm == "moe_parallel":
        return {"parallel": True}
    m = re.fullmatch(r"moe_e([0-9]+)", arm)
    if m and int(m.group(1)) >= 1:
        return {"n_experts": int(m.group(1))}
    m = re.fullmatch(r"moe_cf([0-9]*\.?[0-9]+)", arm)
    if m and float(m.group(1)) > 0:
        return {"capacity_factor": float(m.group(1))}
    raise ValueError(f"MoEMambaConfig: unknown arm {arm!r} in `arms`; an arm is one of {', '.join(ARM_FORMS)} "
                     f"(N a positive int, X a positive number)")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MoEMambaConfig: `{name}` must be a positive int; got {value!r}")


@dataclasses.dataclass(frozen=True)
class MoEMambaConfig:
    """Every knob of one run; the defaults are the `cpu` preset.

    Model sizes: `d_model`, `n_blocks` (MoE-Mamba blocks = Mamba + MoE layer; the baseline has 2·n_blocks
    Mamba layers) and `n_experts` of the main ``moe`` arm; 0 takes the value of the paper `setting`.
    Speedup measure: steps for Mamba to reach a loss / steps for MoE-Mamba, on the training cross-entropy
    smoothed by a debiased EMA with factor `ema` (per logged record: log_every = 1 smooths per step), and on
    the held-out loss (every `eval_every` steps, linear interpolation between evaluations).
    """

    preset: str = "cpu"
    seed: int = 0
    seeds: int = 1                     # seeds seed, seed+1, ...: every arm once per seed (its own init and batches)
    arms: str = "mamba,moe,moe_e1,moe_e4,moe_e16,moe_e32,moe_top2,moe_cf0.5,moe_cf2"
    # -- text (`mamba_jax.data.text` through the `lm` experiment's TextData) --
    text_root: str = ""                # "" = the Python standard library's sources
    text_pattern: str = "*.py"
    text_max_files: int = 400
    text_eval_fraction: float = 0.05
    seq_len: int = 128
    tokenizer: str = "byte"            # byte (vocab 259) | bpe (trained on the training split; `bpe_vocab_size`)
    bpe_vocab_size: int = 1024
    # -- models --
    setting: str = "25m"               # paper setting (PAPER_SETTINGS) for sizes left 0 and the reference number
    d_model: int = 64
    n_blocks: int = 2
    n_experts: int = 8
    d_expert: int = 0                  # expert FFN width; 0 = 3·d_model (the paper's)
    router: str = "switch"
    capacity_factor: float = 1.0
    # routing groups: "batch" (the authors' code: capacity and balancing loss over all of a batch's tokens,
    # position-major so no row's future reaches its past) or "sequence" (each row alone)
    routing: str = "batch"
    aux_loss_coef: float = 0.01
    jitter: float = 0.0                # router-input jitter eps (Switch); per-step rng from `seed`
    dispatch: str = "sorted"
    d_state: int = 16
    expand: int = 2
    scan_impl: str = "auto"
    # -- optimisation (AdamW, warm-up + cosine decay, clipping: the `lm` experiment's optimizer) --
    batch_size: int = 16
    num_steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip_norm: float = 1.0
    lr_schedule: str = "cosine"
    # -- measurement --
    ema: float = 0.9                   # train-loss smoothing factor (0: none)
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"MoEMambaConfig: `preset` must be one of {PRESETS}; got {self.preset!r}")
        if self.setting not in PAPER_SETTINGS:
            raise ValueError(f"MoEMambaConfig: `setting` must be one of {tuple(PAPER_SETTINGS)}; got {self.setting!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoEMambaConfig: `routing` must be one of {ROUTINGS}; got {self.routing!r}")
        if self.router not in ROUTER_NAMES:
            raise ValueError(f"MoEMambaConfig: `router` must be one of {ROUTER_NAMES}; got {self.router!r}")
        for name in ("d_model", "n_blocks", "n_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MoEMambaConfig: `{name}` must be an int >= 0 (0: from `setting`); got {value!r}")
        if isinstance(self.d_expert, bool) or not isinstance(self.d_expert, int) or self.d_expert < 0:
            raise ValueError(f"MoEMambaConfig: `d_expert` must be an int >= 0 (0: 3·d_model); got {self.d_expert!r}")
        for name in ("seeds", "log_every", "eval_every", "eval_batches", "batch_size", "num_steps"):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            raise ValueError(f"MoEMambaConfig: `ema` must be a number in [0, 1); got {self.ema!r}")
        if self.eval_every % self.log_every:
            raise ValueError(f"MoEMambaConfig: `eval_every` ({self.eval_every}) must be a multiple of `log_every` "
                             f"({self.log_every})")
        arms = self.arm_names()
        if len(set(arms)) != len(arms):
            raise ValueError(f"MoEMambaConfig: `arms` lists an arm twice: {self.arms!r}")
        self.lm_config()                      # text, optimizer and loop keys, validated with their names
        for arm in arms:                      # every arm's model builds at these sizes
            self.model_config(arm)

    def arm_names(self) -> Tuple[str, ...]:
        """The arms of `arms`, in order; each validated by `arm_settings`."""
        names = tuple(a.strip() for a in self.arms.split(",") if a.strip()) if isinstance(self.arms, str) else ()
        if not names:
            raise ValueError(f"MoEMambaConfig: `arms` must list at least one arm (comma-separated, one of "
                             f"{', '.join(ARM_FORMS)}); got {self.arms!r}")
        for arm in names:
            arm_settings(arm)
        return names

    def sizes(self) -> Dict[str, int]:
        """d_model, n_blocks, n_experts: this config's, or the paper `setting`'s where 0."""
        base = PAPER_SETTINGS[self.setting]
        return {name: getattr(self, name) or base[name] for name in ("d_model", "n_blocks", "n_experts")}

    def model_config(self, arm: str) -> BaseLMConfig:
        """The model config of `arm`: a `MambaConfig` (``mamba``) or a MoE-Mamba `HybridConfig`."""
        settings = dict(arm_settings(arm))
        baseline = settings.pop("baseline", False)
        kwargs = dict(self.sizes(), router=self.router, capacity_factor=self.capacity_factor,
                      aux_loss_coef=self.aux_loss_coef, jitter=self.jitter, dispatch=self.dispatch,
                      routing_rows=None if self.routing == "batch" else 1,
                      d_state=self.d_state,
                      expand=self.expand, scan_impl=self.scan_impl, d_expert=self.d_expert or None)
        kwargs.update(settings)
        try:
            moe = moe_mamba_config(self.setting, vocab_size=self.lm_config().vocab_size(), **kwargs)
        except ValueError as error:
            raise ValueError(f"MoEMambaConfig: arm {arm!r}: {error}") from None
        return mamba_baseline_config(moe) if baseline else moe

    def lm_config(self) -> LMConfig:
        """The `lm` experiment's config of the same text, optimizer and loop settings (its `TextData`,
        `optimizer_config()` and `loop_config()` are reused; its model fields are not)."""
        return LMConfig(preset="cpu" if self.preset == "cpu_long" else self.preset, task="text", seed=self.seed, seq_len=self.seq_len,
                        text_root=self.text_root, text_pattern=self.text_pattern,
                        text_max_files=self.text_max_files, text_eval_fraction=self.text_eval_fraction,
                        tokenizer=self.tokenizer, bpe_vocab_size=self.bpe_vocab_size,
                        batch_size=self.batch_size, num_steps=self.num_steps,
                        learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                        end_lr_ratio=self.end_lr_ratio, weight_decay=self.weight_decay, b1=self.b1, b2=self.b2,
                        grad_clip_norm=self.grad_clip_norm, lr_schedule=self.lr_schedule,
                        log_every=self.log_every, eval_every=self.eval_every, eval_batches=self.eval_batches,
                        checkpoint_every=self.log_every * math.ceil(self.num_steps / self.log_every),
                        tensorboard=self.tensorboard, progress=self.progress)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# the expert width at which a MoE arm's active parameters equal Mamba's at d_model 64, d_state 16, expand 2
# (`parameter_counts`, tested); the paper matches active parameters, 3·d_model = 192 leaves Mamba 9 % more
CPU_LONG_D_EXPERT = 251

_PRESETS: Dict[str, Dict[str, Any]] = {
    # two arms, tiny models, 16 steps: seconds (jit compiles dominate)
    "smoke": dict(arms="mamba,moe", text_max_files=8, text_eval_fraction=0.25, seq_len=32, d_model=16, n_blocks=1,
                  n_experts=4, d_state=4, batch_size=4, num_steps=16, warmup_steps=2, learning_rate=3e-3,
                  eval_every=8, eval_batches=2, tensorboard=False, progress=False),
    "cpu": {},
    # the paper's protocol (llm-random: capacity and balancing over the batch, lr 1e-3, clip 0.5; the experts
    # ablation 1/4/8/16/32; active parameters matched) at CPU scale: 750 steps x 32 x 128 BPE tokens per arm
    # (3.1M tokens; the suggested 1,500 steps would take ~2 h on 2 cores with 6 arms x 2 seeds)
    "cpu_long": dict(arms="mamba,moe_e1,moe_e4,moe,moe_e16,moe_e32", seeds=2, tokenizer="bpe", text_max_files=0,
                     d_expert=CPU_LONG_D_EXPERT, batch_size=32, num_steps=750, learning_rate=1e-3,
                     warmup_steps=50, grad_clip_norm=0.5, ema=0.95, eval_every=50, eval_batches=8,
                     tensorboard=False),
    # the paper's sizes (d_model, blocks, 42 experts from `setting`); step count, batch and learning rate are
    # this project's choice for a GPU/TPU run, not the paper's exact schedule
    "paper": dict(arms="mamba,moe,moe_e1,moe_e4,moe_e8,moe_e16,moe_e32,moe_top2,moe_cf0.5,"
                       "moe_cf2", text_max_files=0, seq_len=256, d_model=0, n_blocks=0, n_experts=0,
                  batch_size=64, num_steps=25_000, learning_rate=1e-3, warmup_steps=1000, ema=0.99, log_every=10,
                  eval_every=500, eval_batches=32),
}


def preset_config(preset: str = "cpu") -> MoEMambaConfig:
    """The config of `preset` (one of PRESETS)."""
    if preset not in PRESETS:
        raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
    return MoEMambaConfig(preset=preset, **_PRESETS[preset])
