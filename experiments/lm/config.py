"""Configuration of the `lm` experiment: a Mamba LM trained on a synthetic task (selective copying, MQAR).

One flat, frozen dataclass (so that ``key=value`` overrides are simple), three presets:

* ``smoke`` — seconds; used by the tests.
* ``cpu``   — the default (it was `make demo` before the ICL experiment); a few minutes on a 2-core CPU, jit included.
* ``paper`` — GPU scale, close to the papers' settings (see README.md for what differs).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Mapping, Sequence

from mamba_jax.data import make_task
from mamba_jax.layers import MambaConfig
from mamba_jax.train import LoopConfig, OptimizerConfig

TASKS = ("selective_copy", "mqar")
PRESETS = ("smoke", "cpu", "paper")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Every knob of one run; the defaults are the `cpu` preset. Task fields of the other task are ignored."""

    preset: str = "cpu"
    task: str = "selective_copy"
    seed: int = 0
    # -- task (inputs/targets have length seq_len) --
    seq_len: int = 32
    n_tokens_to_copy: int = 4          # selective_copy: data tokens to copy
    n_data_tokens: int = 8             # selective_copy: distinct data token values (vocab = this + 2)
    num_kv_pairs: int = 4              # mqar: key-value pairs (all queried)
    mqar_vocab_size: int = 32          # mqar: keys in [1, V/2), values in [V/2, V)
    mqar_power_a: float = 0.01         # mqar: query-slot power law (Zoology's default 0.01)
    # -- model (MambaLM) --
    d_model: int = 128
    n_layer: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan_impl: str = "auto"
    compute_dtype: str = "float32"     # forward/backward dtype: float32 | bfloat16 (params, optimizer state: float32)
    # -- optimisation (AdamW, warmup + cosine/linear decay, clipping, gradient accumulation) --
    batch_size: int = 16               # sequences per optimizer step
    grad_accum_steps: int = 1          # micro-batches per step (batch_size / grad_accum_steps sequences each)
    lr_schedule: str = "cosine"        # decay after warmup: cosine | linear
    num_steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip_norm: float = 1.0
    # -- loop --
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    max_checkpoints_to_keep: int = 2
    tensorboard: bool = True           # also write the metrics as TensorBoard events to <run>/tensorboard/
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"LMConfig: `task` must be one of {TASKS}; got {self.task!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"LMConfig: `preset` must be one of {PRESETS}; got {self.preset!r}")
        for name in ("eval_batches", "batch_size", "max_checkpoints_to_keep", "grad_accum_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig: `{name}` must be a positive int; got {value!r}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"LMConfig: `grad_accum_steps` ({self.grad_accum_steps}) must divide `batch_size` "
                             f"({self.batch_size}) into equal micro-batches")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"LMConfig: `compute_dtype` must be one of {COMPUTE_DTYPES}; got {self.compute_dtype!r}")
        # Build the parts once, so that a bad value fails here, naming its field.
        self.make_task()
        self.model_config()
        self.optimizer_config()
        self.loop_config()

    def make_task(self):
        """The synthetic task (a `SelectiveCopyTask` or `MQARTask`)."""
        if self.task == "selective_copy":
            return make_task("selective_copy", seq_len=self.seq_len, n_tokens_to_copy=self.n_tokens_to_copy,
                             n_data_tokens=self.n_data_tokens)
        return make_task("mqar", seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs,
                         vocab_size=self.mqar_vocab_size, power_a=self.mqar_power_a)

    def model_config(self) -> MambaConfig:
        return MambaConfig(vocab_size=self.make_task().vocab_size, d_model=self.d_model, n_layer=self.n_layer,
                           d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                           scan_impl=self.scan_impl, dtype=self.compute_dtype, param_dtype="float32")

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                               total_steps=self.num_steps, end_lr_ratio=self.end_lr_ratio,
                               weight_decay=self.weight_decay, b1=self.b1, b2=self.b2,
                               grad_clip_norm=self.grad_clip_norm, lr_schedule=self.lr_schedule)

    def loop_config(self, stop_after=None) -> LoopConfig:
        return LoopConfig(num_steps=self.num_steps, log_every=self.log_every, eval_every=self.eval_every,
                          checkpoint_every=self.checkpoint_every, stop_after=stop_after,
                          tokens_per_step=self.batch_size * self.seq_len, progress=self.progress)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Preset values: common ones, then per-task ones (which win).
_PRESET_VALUES: Dict[str, Dict[str, Any]] = {
    "smoke": dict(seq_len=16, n_tokens_to_copy=2, n_data_tokens=4, num_kv_pairs=2, mqar_vocab_size=16,
                  d_model=16, n_layer=1, d_state=4, batch_size=8, num_steps=20, warmup_steps=2,
                  log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10, progress=False),
    # The defaults: chosen (and timed) to learn selective copying to ~100% in under 5 min on 2 CPU cores.
    "cpu": dict(),
    # Mamba paper (arXiv 2312.00752) App. E.1 selective copying: 2 layers, D = 64, noise region of
    # 4096 tokens, 16 data tokens, vocabulary 16. Zoology MQAR: sequence 512, 64 kv pairs, vocab 8192.
    "paper": dict(d_model=64, n_layer=2, d_state=16, batch_size=64, num_steps=400_000, learning_rate=1e-3,
                  warmup_steps=1000, log_every=100, eval_every=5000, eval_batches=16,
                  checkpoint_every=5000, progress=True),
}
_TASK_PRESET_VALUES: Dict[tuple, Dict[str, Any]] = {
    ("paper", "selective_copy"): dict(seq_len=4096 + 16, n_tokens_to_copy=16, n_data_tokens=14),
    ("paper", "mqar"): dict(seq_len=512, num_kv_pairs=64, mqar_vocab_size=8192, d_model=256, n_layer=2),
}


def preset_config(preset: str = "cpu", task: str = "selective_copy") -> LMConfig:
    """The config of `preset` for `task`."""
    if preset not in PRESETS:
        raise ValueError(f"preset_config: `preset` must be one of {PRESETS}; got {preset!r}")
    if task not in TASKS:
        raise ValueError(f"preset_config: `task` must be one of {TASKS}; got {task!r}")
    values = {**_PRESET_VALUES[preset], **_TASK_PRESET_VALUES.get((preset, task), {})}
    return LMConfig(preset=preset, task=task, **values)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_value(name: str, field_type: Any, text: str) -> Any:
    """Convert the command-line text of field `name` to the field's type (int, float, bool or str)."""
    if field_type is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"config key `{name}` expects type bool ({'/'.join(_TRUE + _FALSE)}); got {text!r}")
    try:
        return field_type(text)
    except ValueError:
        raise ValueError(f"config key `{name}` expects type {field_type.__name__}; got {text!r}") from None


def parse_overrides(items: Sequence[str]) -> Dict[str, str]:
    """``["key=value", ...]`` (a leading ``--config.`` is allowed) -> ``{key: value}``, unconverted."""
    out: Dict[str, str] = {}
    for item in items:
        body = item[len("--config."):] if item.startswith("--config.") else item
        key, sep, value = body.partition("=")
        if not sep or not key:
            raise ValueError(f"config override must look like key=value; got {item!r}")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(config, overrides: Mapping[str, str]):
    """A copy of the dataclass `config` (LMConfig or another experiment's flat config) with
    ``{key: text}`` overrides converted to each field's type.

    Raises ValueError naming the key for an unknown key (with the closest valid keys) or a bad value.
    """
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, text in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key `{key}`{hint} Valid keys: {', '.join(sorted(hints))}")
        changes[key] = parse_value(key, hints[key], text)
    return dataclasses.replace(config, **changes)


def config_from_dict(values: Mapping[str, Any]) -> LMConfig:
    """An LMConfig from a config.json dict (unknown keys are an error)."""
    unknown = set(values) - set(typing.get_type_hints(LMConfig))
    if unknown:
        raise ValueError(f"config_from_dict: unknown config keys {sorted(unknown)}")
    return LMConfig(**values)
