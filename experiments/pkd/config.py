"""Configuration of the `pkd` experiment (Medina et al., "Mamba base PKD for efficient knowledge compression",
arXiv 2503.01727): a Mamba teacher, a progressive ensemble of small Mamba students, and two single-student arms.

One flat frozen dataclass (``key=value`` overrides through `experiments.lm.config.apply_overrides`), three
presets:

* ``smoke`` — scikit-learn's 8×8 digits, tiny models, a few seconds of training; used by the tests.
* ``cpu``   — the default: Fashion-MNIST (Debian `dataset-fashion-mnist`), pixel-row tokens, a 3-layer
  bidirectional teacher and 6 one-layer bidirectional students; about 23 minutes on a 2-core CPU.
* ``cpu_long`` — the paper's protocol at CPU scale on MNIST (the 10k set): 7 one-layer students from ~1 % to
  ~15 % of the teacher's analytic FLOPs each, both ensemble rules, a direct KD student at every cumulative
  budget, 2 seeds (``dataset=fashion_mnist`` for Fashion-MNIST).
* ``paper`` — Fashion-MNIST with 4×4 patches, a wider teacher, 7 students, longer training: a GPU job.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

from mamba_jax.data.images import DATASETS
from mamba_jax.models.classifier import ClassifierConfig

PRESETS = ("smoke", "cpu", "cpu_long", "paper")
# How an ensemble of students predicts: "additive" (B-DISTIL: F_m = F_{m-1} + f_m in logit space, student m
# trained on the sum with students 1..m-1 frozen) or "mean_softmax" (the mean of the students' softmaxes,
# each student trained alone with boosting weights from the ensemble before it).
ENSEMBLE_RULES = ("additive", "mean_softmax")
IMAGE_SHAPES = {"fashion_mnist": (28, 28), "mnist": (28, 28), "digits": (8, 8)}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PKDConfig: `{name}` must be a positive int; got {value!r}")


@dataclasses.dataclass(frozen=True)
class PKDConfig:
    """Every knob of one run; the defaults are the `cpu` preset.

    Students: `student_d_models` lists the width of each of the K students in training order (all with
    `student_layers` layers and `student_d_state`). The single-student arms ("direct": distilled from the
    teacher; "labels": cross-entropy only) share one architecture whose width is searched so that its
    FLOPs per example come closest to the whole ensemble's (`single_layers` layers); they train
    `single_steps` steps, which at equal FLOPs per example is the ensemble's total training compute when
    single_steps = student_steps.
    Ensembles (`ensembles`, ENSEMBLE_RULES): "additive" — student m's logits f_m are added to the frozen
    sum F_{m−1} of the students before it (their logits precomputed like the teacher's), and the loss
    α·CE + (1−α)·T²·KL(teacher_T ‖ softmax((F_{m−1} + f_m)/T)) is that of the sum; "mean_softmax" — each
    student's own loss α·CE + (1−α)·T²·KL(teacher_T ‖ student_T), per-example weighted by boosting weights
    (before student m+1): w_i ∝ exp(β · ℓ_i), ℓ_i the cross-entropy of the current ensemble (mean of its
    students' softmaxes) on example i, normalised to mean 1 and clipped at `boost_max_weight` (then
    normalised again); uniform for the first student.
    """

    preset: str = "cpu"
    dataset: str = "fashion_mnist"        # fashion_mnist | mnist | digits
    seed: int = 0
    seeds: int = 1                        # seeds seed, seed+1, ...: the whole run once per seed, then the summary
    patch_size: int = 0                   # 0: one token per pixel row; p: p×p patches
    # -- teacher --
    teacher_d_model: int = 48
    teacher_layers: int = 3
    teacher_d_state: int = 8
    teacher_bidirectional: bool = True
    teacher_steps: int = 1500
    # -- students (the progressive ensemble) --
    student_d_models: str = "16,16,24,24,32,32"
    student_layers: int = 1
    student_d_state: int = 4
    student_bidirectional: bool = True
    student_steps: int = 600
    # -- the single-student arms (same FLOPs as the whole ensemble) --
    single_layers: int = 1
    single_steps: int = 600
    # a direct KD student at every prefix's cumulative FLOPs (the ensemble of m students, m = 1..K), not
    # only at the whole ensemble's
    direct_per_budget: bool = False
    # -- loss --
    alpha: float = 0.5                    # weight of the hard-label CE; 1 − alpha on the KD term
    temperature: float = 2.0
    boost_beta: float = 1.0               # mean_softmax only: the boosting weights' β
    boost_max_weight: float = 20.0
    # ensembles trained in the run, the first being the main one (tables, measurements): ENSEMBLE_RULES
    ensembles: str = "additive,mean_softmax"
    # -- optimisation (AdamW, warm-up + cosine decay, clipping: mamba_jax.train.optim) --
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # -- evaluation and measurement --
    eval_batch_size: int = 256            # 256: the predictions reuse the batch-256 latency compile on a CPU
    max_eval_examples: int = 0            # 0: the whole test split
    latency_repeats: int = 5              # calls per timing (median reported)
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"PKDConfig: `preset` must be one of {PRESETS}; got {self.preset!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"PKDConfig: `dataset` must be one of {DATASETS}; got {self.dataset!r}")
        for name in ("seeds", "teacher_d_model", "teacher_layers", "teacher_d_state", "teacher_steps", "student_layers",
                     "student_d_state", "student_steps", "single_layers", "single_steps", "batch_size",
                     "eval_batch_size", "latency_repeats", "log_every"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 0:
            raise ValueError(f"PKDConfig: `patch_size` must be an int >= 0; got {self.patch_size!r}")
        if isinstance(self.max_eval_examples, bool) or not isinstance(self.max_eval_examples, int) \
                or self.max_eval_examples < 0:
            raise ValueError(f"PKDConfig: `max_eval_examples` must be an int >= 0; got {self.max_eval_examples!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"PKDConfig: `alpha` must be in [0, 1]; got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"PKDConfig: `temperature` must be > 0; got {self.temperature!r}")
        if not self.boost_beta >= 0:
            raise ValueError(f"PKDConfig: `boost_beta` must be >= 0; got {self.boost_beta!r}")
        if not self.boost_max_weight >= 1:
            raise ValueError(f"PKDConfig: `boost_max_weight` must be >= 1; got {self.boost_max_weight!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"PKDConfig: `learning_rate` must be > 0; got {self.learning_rate!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0 \
                or self.warmup_steps >= min(self.teacher_steps, self.student_steps, self.single_steps):
            raise ValueError(f"PKDConfig: `warmup_steps` must be an int in [0, min(teacher_steps, student_steps, "
                             f"single_steps)); got {self.warmup_steps!r}")
        self.student_widths()
        self.ensemble_rules()
        self.teacher_config()

    @property
    def image_shape(self) -> Tuple[int, int]:
        return IMAGE_SHAPES[self.dataset]

    def student_widths(self) -> Tuple[int, ...]:
        """The K student widths, parsed from `student_d_models`."""
        try:
            widths = tuple(int(x) for x in self.student_d_models.split(",") if x.strip())
        except ValueError:
            widths = ()
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"PKDConfig: `student_d_models` must be comma-separated positive ints (one per "
                             f"student); got {self.student_d_models!r}")
        return widths

    def ensemble_rules(self) -> Tuple[str, ...]:
        """The ensembles of the run (`ensembles`), the main one first."""
        rules = tuple(x.strip() for x in self.ensembles.split(",") if x.strip())
        if not rules or len(set(rules)) != len(rules) or set(rules) - set(ENSEMBLE_RULES):
            raise ValueError(f"PKDConfig: `ensembles` must be a comma-separated subset of {ENSEMBLE_RULES}; got "
                             f"{self.ensembles!r}")
        return rules

    def _classifier(self, d_model: int, n_layer: int, d_state: int, bidirectional: bool) -> ClassifierConfig:
        h, w = self.image_shape
        try:
            return ClassifierConfig(n_classes=10, image_height=h, image_width=w, channels=1,
                                    patch_size=self.patch_size, d_model=d_model, n_layer=n_layer, d_state=d_state,
                                    bidirectional=bidirectional)
        except ValueError as error:  # e.g. a patch size that does not divide the image
            raise ValueError(f"PKDConfig: {error}") from None

    def teacher_config(self) -> ClassifierConfig:
        return self._classifier(self.teacher_d_model, self.teacher_layers, self.teacher_d_state,
                                self.teacher_bidirectional)

    def student_configs(self) -> Tuple[ClassifierConfig, ...]:
        return tuple(self._classifier(w, self.student_layers, self.student_d_state, self.student_bidirectional)
                     for w in self.student_widths())

    def single_config(self, d_model: int) -> ClassifierConfig:
        """The single-student architecture at width `d_model` (the run searches the width)."""
        return self._classifier(d_model, self.single_layers, self.student_d_state, self.student_bidirectional)


_PRESETS = {
    "smoke": dict(dataset="digits", teacher_d_model=24, teacher_layers=1, teacher_d_state=4, teacher_steps=120,
                  student_d_models="6,6,6", student_layers=1, student_bidirectional=False, student_d_state=2,
                  student_steps=60, single_steps=40, direct_per_budget=True, batch_size=64, learning_rate=1e-2, warmup_steps=5,
                  eval_batch_size=256, latency_repeats=2, log_every=20, progress=False),
    "cpu": {},
    # students of 1.1, 1.6, 2.9, 4.6, 6.7, 9.1 and 14.8 % of the teacher's analytic FLOPs (40.8 % together)
    "cpu_long": dict(dataset="mnist", student_d_models="6,8,12,16,20,24,32", direct_per_budget=True, seeds=2,
                     latency_repeats=3, progress=False),
    "paper": dict(patch_size=4, teacher_d_model=128, teacher_layers=6, teacher_d_state=16, teacher_steps=20_000,
                  student_d_models="8,12,16,24,32,48,64", student_layers=2, student_d_state=8,
                  student_steps=5_000, single_layers=2, single_steps=5_000, batch_size=128, learning_rate=2e-3,
                  warmup_steps=500, log_every=200),
}


def preset_config(preset: str = "cpu") -> PKDConfig:
    """The config of `preset` (one of PRESETS)."""
    if preset not in PRESETS:
        raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
    return PKDConfig(preset=preset, **_PRESETS[preset])
