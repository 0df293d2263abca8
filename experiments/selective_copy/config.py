"""Configuration of `mamba-jax run selective_copy`: the Mamba paper's selective copying, not teacher-forced,
for three arms of the same width and depth.

* ``s6``          — Mamba-1 with its selective SSM (Δ, B, C functions of the input): the paper's "Mamba / S6".
* ``lti``         — the same architecture with an LTI SSM (Δ, B, C parameters: `MambaConfig(selective=False)`),
  the paper's "Mamba / S4" row (S4D-real initialisation here, not S4's).
* ``transformer`` — a Llama-style Transformer (rotary positions, SwiGLU), the same d_model and n_layer.

Each arm is one `mamba-jax run lm --task selective_copy` run (its own directory, resumable); this module only
fixes their shared settings. Presets: ``smoke`` (seconds, the tests), ``cpu`` (a noise region of 256, 2 CPU
cores), ``paper`` (App. E.1: 2 layers, D = 64, noise 4096, 16 data tokens, vocabulary 16, 400k steps).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

PRESETS = ("smoke", "cpu", "paper")
# arm -> LMConfig fields that make it
ARMS: Dict[str, Dict[str, object]] = {
    "s6": dict(architecture="mamba", selective=True),
    "lti": dict(architecture="mamba", selective=False),
    "transformer": dict(architecture="transformer"),
}
# Gu & Dao 2023 (arXiv 2312.00752), Table 1, Mamba architecture: S6 layer 99.8 %, S4 layer 56.4 %
# (no Transformer row).
PAPER_ACCURACY = {"s6": 0.998, "lti": 0.564, "transformer": None}


@dataclasses.dataclass(frozen=True)
class SelectiveCopyConfig:
    """Every knob of one comparison; the defaults are the `cpu` preset."""

    preset: str = "cpu"
    arms: str = "s6,lti,transformer"
    seed: int = 0
    noise_len: int = 256               # the noise region (the paper: 4096); seq_len = noise_len + n_tokens_to_copy
    n_tokens_to_copy: int = 4          # the paper: 16
    n_data_tokens: int = 8             # the paper: 14 (vocabulary 16 with noise and marker)
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    n_heads: int = 4
    num_steps: int = 2500
    batch_size: int = 16
    learning_rate: float = 1e-3         # the paper's (App. E.1); at 3e-3 S6 stayed at chance on noise 128 (README)
    warmup_steps: int = 50
    log_every: int = 25
    eval_every: int = 250
    eval_batches: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"SelectiveCopyConfig: `preset` must be one of {PRESETS}; got {self.preset!r}")
        for name in ("noise_len", "n_tokens_to_copy", "n_data_tokens", "d_model", "n_layer", "d_state", "n_heads",
                     "num_steps", "batch_size", "warmup_steps", "log_every", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelectiveCopyConfig: `{name}` must be a positive int; got {value!r}")
        if self.noise_len < self.n_tokens_to_copy:
            raise ValueError(f"SelectiveCopyConfig: `noise_len`={self.noise_len} must hold the "
                             f"`n_tokens_to_copy`={self.n_tokens_to_copy} data tokens")
        self.arm_names()
        for arm in self.arm_names():
            self.lm_config(arm)

    @property
    def seq_len(self) -> int:
        return self.noise_len + self.n_tokens_to_copy

    def arm_names(self) -> Tuple[str, ...]:
        names = tuple(x.strip() for x in self.arms.split(",") if x.strip())
        bad = sorted(set(names) - set(ARMS))
        if bad or not names or len(set(names)) != len(names):
            raise ValueError(f"SelectiveCopyConfig: `arms` must be a comma-separated subset of {tuple(ARMS)}; "
                             f"got {self.arms!r}")
        return names

    def lm_overrides(self, arm: str) -> Dict[str, object]:
        """The LMConfig fields of `arm`'s run (on top of the `lm` preset of the same name)."""
        return dict(task="selective_copy", preset="paper" if self.preset == "paper" else "cpu", seed=self.seed,
                    seq_len=self.seq_len, n_tokens_to_copy=self.n_tokens_to_copy, n_data_tokens=self.n_data_tokens,
                    copy_teacher_forced=False, d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state,
                    n_heads=self.n_heads, num_steps=self.num_steps, batch_size=self.batch_size,
                    learning_rate=self.learning_rate, warmup_steps=self.warmup_steps, log_every=self.log_every,
                    eval_every=self.eval_every, eval_batches=self.eval_batches, checkpoint_every=self.eval_every,
                    tensorboard=False, progress=self.progress, **ARMS[arm])

    def lm_config(self, arm: str):
        from experiments.lm.config import LMConfig, preset_config

        values = self.lm_overrides(arm)
        base = dataclasses.asdict(preset_config(values["preset"], "selective_copy"))
        return LMConfig(**{**base, **values})

    def lm_arguments(self, arm: str) -> List[str]:
        """`mamba-jax run lm` key=value arguments of `arm`'s run."""
        values = self.lm_overrides(arm)
        return [f"{k}={v}" for k, v in values.items() if k not in ("task", "preset")]


_PRESETS = {
    "smoke": dict(noise_len=12, n_tokens_to_copy=2, n_data_tokens=4, d_model=16, n_layer=1, d_state=4, n_heads=2,
                  num_steps=8, batch_size=4, warmup_steps=2, log_every=4, eval_every=8, eval_batches=1,
                  progress=False),
    "cpu": {},
    "paper": dict(noise_len=4096, n_tokens_to_copy=16, n_data_tokens=14, num_steps=400_000, batch_size=64,
                  learning_rate=1e-3, warmup_steps=1000, log_every=100, eval_every=5000, eval_batches=16),
}


def preset_config(preset: str = "cpu") -> SelectiveCopyConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
    return SelectiveCopyConfig(preset=preset, **_PRESETS[preset])
