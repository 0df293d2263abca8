"""Configuration of the `icl` experiment (Garg et al. function classes; Grazzi et al.'s Mamba vs Transformer).

One flat frozen dataclass (``key=value`` overrides), three presets:

* ``smoke`` — seconds; used by the tests.
* ``cpu``   — the default and `make demo`: linear regression at d = 4, Mamba (4 × 32) vs a Transformer
  (3 × 32, 4 heads) vs the exact baselines, about 3 minutes on a 2-core CPU.
* ``cpu_long`` — d = 8, Mamba vs both papers' Transformers, 3 seeds, 8,000 steps (≤ 60 minutes on 2 cores).
* ``paper`` — d = 20 and the papers' sizes (Mamba 24 × 256, Transformer 12 × 256 with 8 heads), the
  Garg et al. curriculum and 500k steps: a GPU job.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from experiments.icl.train import LINEAR_TASKS, LR_SCHEDULES, Curriculum
from mamba_jax.data.function_classes import TASKS
from mamba_jax.models import HybridConfig, Mamba2Config, MambaConfig, TransformerConfig
from mamba_jax.models.icl import InContextRegressor

PRESETS = ("smoke", "cpu", "cpu_long", "paper")
# "transformer" takes its positions from `transformer_positions`; the two named arms are the papers' own:
# Garg et al.'s GPT-2 learns absolute positions, Grazzi et al.'s zeroes and freezes them
# (`remove_pos_embedding: True` in automl/is_mamba_capable_of_icl), i.e. it has none.
MODEL_NAMES = ("mamba", "mamba2", "transformer", "transformer_garg", "transformer_grazzi", "hybrid")
TRANSFORMER_ARMS = {"transformer_garg": "learned", "transformer_grazzi": "none"}
# The papers' model sizes (Garg et al.'s standard / small / tiny; Grazzi et al. give Mamba twice the layers):
MODEL_SIZES = {
    "standard": dict(d_model=256, mamba_layers=24, transformer_layers=12, n_heads=8),
    "small": dict(d_model=128, mamba_layers=12, transformer_layers=6, n_heads=4),
    "tiny": dict(d_model=64, mamba_layers=6, transformer_layers=3, n_heads=2),
}


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """Every knob of one run; the defaults are the `cpu` preset."""

    preset: str = "cpu"
    task: str = "linear_regression"
    seed: int = 0
    seeds: int = 1                        # models per arm, seeds seed .. seed + seeds - 1 (vmapped: one step each)
    d: int = 4
    models: str = "mamba,transformer"     # comma-separated subset of MODEL_NAMES
    d_model: int = 32
    mamba_layers: int = 4                 # Mamba layers have no MLP; the papers give Mamba twice the layers
    transformer_layers: int = 3
    n_heads: int = 4
    # positions of the "transformer" arm: learned (Garg et al.'s GPT-2), none (Grazzi et al.'s GPT-2, whose
    # position embeddings are zeroed and frozen) or rope; the named arms fix them (TRANSFORMER_ARMS)
    transformer_positions: str = "learned"   # learned | rope | none
    # std of the attention projections' initialisation: GPT-2's 0.02 suits width 256; at width 32 it leaves
    # q·k ≈ 0 for hundreds of steps, so the CPU preset uses ≈ 1/sqrt(d_model) (measured: README).
    attention_init: float = 0.18
    hybrid_pattern: str = "M A M M"
    # curriculum (Garg et al.): dimensions d_start → d (+1), points points_start → points_end (+points_increment)
    d_start: int = 2
    points_start: int = 5
    points_end: int = 11
    points_increment: int = 2
    curriculum_interval: int = 250
    num_steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"         # constant (Garg et al.) | cosine (warm-up, decay to 1 %)
    eval_prompts: int = 512
    eval_points: int = 15                 # > points_end: the tail is out of distribution (more examples)
    ood_scales: str = "0.333,0.5,2,3"     # Garg et al.'s OOD suite: x (and, apart, y) scaled by these factors
    probe: bool = True                    # per-layer probes and gradient-descent iterations (linear tasks)
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"ICLConfig: `preset` must be one of {PRESETS}; got {self.preset!r}")
        if self.task not in TASKS:
            raise ValueError(f"ICLConfig: `task` must be one of {TASKS}; got {self.task!r}")
        for name in ("seeds", "d", "d_model", "mamba_layers", "transformer_layers", "n_heads", "num_steps", "batch_size",
                     "eval_prompts", "eval_points", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ICLConfig: `{name}` must be a positive int; got {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"ICLConfig: `lr_schedule` must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if self.eval_points < self.points_end:
            raise ValueError(f"ICLConfig: `eval_points`={self.eval_points} must be >= `points_end`={self.points_end}")
        self.curricula()
        self.model_configs()
        self.x_scales()

    def x_scales(self) -> Tuple[float, ...]:
        """The out-of-distribution input scales, parsed from `ood_scales` ("" for none)."""
        try:
            scales = tuple(float(x) for x in self.ood_scales.split(",") if x.strip())
        except ValueError:
            scales = (0.0,)
        if any(not s > 0 for s in scales):
            raise ValueError(f"ICLConfig: `ood_scales` must be comma-separated positive floats; got {self.ood_scales!r}")
        return scales

    def full_size_step(self) -> int:
        """The first step at which the curriculum trains at full dimension and length."""
        dims, points = self.curricula()
        stages = max(-(-(dims.end - dims.start) // max(dims.increment, 1)),
                     -(-(points.end - points.start) // max(points.increment, 1)) if points.increment else 0)
        return stages * self.curriculum_interval

    def model_names(self) -> Tuple[str, ...]:
        names = tuple(x.strip() for x in self.models.split(",") if x.strip())
        bad = sorted(set(names) - set(MODEL_NAMES))
        if bad or not names:
            raise ValueError(f"ICLConfig: `models` must be a comma-separated subset of {MODEL_NAMES}; got {self.models!r}")
        return names

    def curricula(self) -> Tuple[Curriculum, Curriculum]:
        dims = Curriculum(min(self.d_start, self.d), self.d, 1, self.curriculum_interval)
        points = Curriculum(self.points_start, self.points_end, self.points_increment, self.curriculum_interval)
        return dims, points

    def model_configs(self):
        """{name: family config}: the Transformer arms differ only in their positions (`TRANSFORMER_ARMS`)."""
        common = dict(vocab_size=1, d_model=self.d_model)
        attention = TransformerConfig(**common, n_layer=self.transformer_layers, n_heads=self.n_heads,
                                      d_intermediate=4 * self.d_model,
                                      position_embedding=self.transformer_positions,
                                      initializer_range=self.attention_init,
                                      max_position_embeddings=2 * self.eval_points)
        mamba = MambaConfig(**common, n_layer=self.mamba_layers)
        mamba2 = Mamba2Config(**common, n_layer=self.mamba_layers, head_dim=min(64, 2 * self.d_model),
                              d_state=64, chunk_size=64)
        configs = dict(mamba=mamba, mamba2=mamba2, transformer=attention,
                       **{arm: attention.replace(position_embedding=pos) for arm, pos in TRANSFORMER_ARMS.items()},
                       # the hybrid's initializer_range (0.02) is common to its layers, attention included
                       hybrid=HybridConfig(pattern=self.hybrid_pattern, **common, mamba=mamba, mamba2=mamba2,
                                           attention=attention.replace(initializer_range=0.02)))
        return {name: configs[name] for name in self.model_names()}

    def build_models(self):
        return {name: InContextRegressor(cfg) for name, cfg in self.model_configs().items()}


_PRESETS = {
    "smoke": dict(d=3, d_model=16, mamba_layers=2, transformer_layers=1, d_start=2, points_start=4, points_end=7,
                  curriculum_interval=10, num_steps=30, batch_size=8, eval_prompts=32, eval_points=9, log_every=10,
                  progress=False),
    "cpu": {},
    # ≤ 60 min on 2 cores: d = 8 (dims 3 → 8, points 9 → 17, 500 steps a stage: full size at step 2500),
    # Mamba beside both papers' Transformers, 3 seeds each, evaluated to twice the trained length
    "cpu_long": dict(d=8, d_start=3, points_start=9, points_end=17, points_increment=2, curriculum_interval=500,
                     num_steps=8000, models="mamba,transformer_garg,transformer_grazzi", seeds=3,
                     lr_schedule="cosine", eval_points=34, log_every=100),
    "paper": dict(d=20, **MODEL_SIZES["standard"], attention_init=0.02,
                  d_start=5, points_start=11, points_end=41, curriculum_interval=2000, num_steps=500_000,
                  batch_size=64, learning_rate=1e-4, eval_prompts=1280, eval_points=81, log_every=500),
}


def preset_config(preset: str = "cpu", task: str = "linear_regression", size: Optional[str] = None) -> ICLConfig:
    """The config of `preset` for `task` (ReLU nets and trees get Garg et al.'s longer prompts at paper scale),
    with the model sizes of `size` ("standard", "small", "tiny": MODEL_SIZES) if given."""
    if preset not in PRESETS:
        raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
    if size is not None and size not in MODEL_SIZES:
        raise ValueError(f"preset_config: `size` must be one of {tuple(MODEL_SIZES)}; got {size!r}")
    values = dict(_PRESETS[preset])
    if preset == "paper" and task not in LINEAR_TASKS:
        values.update(points_start=26, points_end=101, points_increment=5, eval_points=141)
    if size is not None:
        values.update(MODEL_SIZES[size])
    return ICLConfig(preset=preset, task=task, **values)
