"""Configuration of the `lm` experiment: a Mamba LM trained on a synthetic task (selective copying, MQAR)
or on real text (`text`: the Python standard library's sources, packed into rows of `seq_len`).

One flat, frozen dataclass (so that ``key=value`` overrides are simple), three presets:

* ``smoke`` — seconds; used by the tests.
* ``cpu``   — the default (it was `make demo` before the ICL experiment); a few minutes on a 2-core CPU, jit included.
* ``paper`` — GPU scale, close to the papers' settings (see README.md for what differs).
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import typing
from typing import Any, Dict, Mapping, Sequence, Union

from mamba_jax.data import make_task
from mamba_jax.layers import MambaConfig, TransformerConfig
from mamba_jax.train import LoopConfig, OptimizerConfig

TASKS = ("selective_copy", "mqar", "text")
DEFAULT_TASK = "text"  # of `mamba-jax run lm` without --task
PRESETS = ("smoke", "cpu", "paper")
COMPUTE_DTYPES = ("float32", "bfloat16")
ARCHITECTURES = ("mamba", "transformer")
TOKENIZERS = ("byte", "bpe")
BYTE_VOCAB_SIZE = 259  # mamba_jax.data.text.ByteTokenizer: 256 byte values + BOS, EOS, PAD


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
    copy_teacher_forced: bool = True   # selective_copy: False = the Mamba paper's (markers in the answer region)
    num_kv_pairs: int = 4              # mqar: key-value pairs (all queried)
    mqar_vocab_size: int = 32          # mqar: keys in [1, V/2), values in [V/2, V)
    mqar_power_a: float = 0.01         # mqar: query-slot power law (Zoology's default 0.01)
    text_root: str = ""                # text: corpus folder ("" = the Python standard library's sources)
    text_pattern: str = "*.py"         # text: fnmatch pattern on file names
    text_max_files: int = 0            # text: the first N files of the sorted corpus (0 = all), both splits
    text_eval_fraction: float = 0.05   # text: share of files held out for eval (stable hash of the path)
    tokenizer: str = "byte"            # text: byte (vocab 259) | bpe (trained on the train split)
    bpe_vocab_size: int = 1024         # text, bpe: target vocabulary (specials included; the model's vocab)
    # -- model: a Mamba LM, or a Llama-style Transformer of the same width and depth (rotary positions) --
    architecture: str = "mamba"        # mamba | transformer
    n_heads: int = 4                   # transformer: attention heads (d_intermediate = 4 · d_model)
    d_model: int = 128
    n_layer: int = 2
    d_state: int = 16
    d_conv: int = 4
    selective: bool = True             # False: the LTI ablation (Δ, B, C independent of the input; MambaConfig)
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
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"LMConfig: `architecture` must be one of {ARCHITECTURES}; got {self.architecture!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"LMConfig: `compute_dtype` must be one of {COMPUTE_DTYPES}; got {self.compute_dtype!r}")
        self._check_text_fields()
        # Build the parts once, so that a bad value fails here, naming its field.
        if self.task != "text":
            self.make_task()
        self.model_config()
        self.optimizer_config()
        self.loop_config()

    def _check_text_fields(self):
        """Validate the text keys (types always; the corpus folder only when the task is `text`)."""
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"LMConfig: `tokenizer` must be one of {TOKENIZERS}; got {self.tokenizer!r}")
        if isinstance(self.bpe_vocab_size, bool) or not isinstance(self.bpe_vocab_size, int) \
                or self.bpe_vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(f"LMConfig: `bpe_vocab_size` must be an int >= {BYTE_VOCAB_SIZE} (256 byte symbols "
                             f"+ 3 specials); got {self.bpe_vocab_size!r}")
        if isinstance(self.text_max_files, bool) or not isinstance(self.text_max_files, int) \
                or self.text_max_files < 0:
            raise ValueError(f"LMConfig: `text_max_files` must be a non-negative int (0 = all files); got "
                             f"{self.text_max_files!r}")
        if not isinstance(self.text_pattern, str) or not self.text_pattern:
            raise ValueError(f"LMConfig: `text_pattern` must be a non-empty fnmatch pattern such as '*.py'; got "
                             f"{self.text_pattern!r}")
        if isinstance(self.text_eval_fraction, bool) or not isinstance(self.text_eval_fraction, (int, float)) \
                or not 0.0 < self.text_eval_fraction < 1.0:
            raise ValueError(f"LMConfig: `text_eval_fraction` must be in (0, 1); got {self.text_eval_fraction!r}")
        if not isinstance(self.text_root, str):
            raise ValueError(f"LMConfig: `text_root` must be a folder path (\"\" = the standard library); got "
                             f"{self.text_root!r}")
        if self.task == "text":
            if self.text_root and not os.path.isdir(self.text_root):
                raise ValueError(f"LMConfig: `text_root` must be an existing folder (\"\" = the standard library); "
                                 f"got {self.text_root!r}")
            if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
                raise ValueError(f"LMConfig: `seq_len` must be an int >= 2; got {self.seq_len!r}")

    def text_root_dir(self) -> str:
        """The text corpus folder (`text_root`, or the standard library's)."""
        from mamba_jax.data.text import default_text_root

        return os.path.abspath(self.text_root or default_text_root())

    def vocab_size(self) -> int:
        """The model's vocabulary: the synthetic task's, or the tokenizer's (byte: 259; bpe: `bpe_vocab_size`,
        an upper bound of the trained tokenizer's, which can come out smaller on a small corpus)."""
        if self.task != "text":
            return self.make_task().vocab_size
        return BYTE_VOCAB_SIZE if self.tokenizer == "byte" else self.bpe_vocab_size

    def make_task(self):
        """The synthetic task (a `SelectiveCopyTask` or `MQARTask`); the `text` task has none (see run.py)."""
        if self.task == "text":
            raise ValueError("LMConfig.make_task: the `text` task reads files (mamba_jax.data.text), it is not a "
                             "synthetic task")
        if self.task == "selective_copy":
            return make_task("selective_copy", seq_len=self.seq_len, n_tokens_to_copy=self.n_tokens_to_copy,
                             n_data_tokens=self.n_data_tokens, teacher_forced=self.copy_teacher_forced)
        return make_task("mqar", seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs,
                         vocab_size=self.mqar_vocab_size, power_a=self.mqar_power_a)

    def model_config(self) -> Union[MambaConfig, TransformerConfig]:
        common = dict(vocab_size=self.vocab_size(), d_model=self.d_model, n_layer=self.n_layer,
                      dtype=self.compute_dtype, param_dtype="float32")
        if self.architecture == "transformer":
            return TransformerConfig(**common, n_heads=self.n_heads, d_intermediate=4 * self.d_model,
                                     max_position_embeddings=max(2048, self.seq_len))
        return MambaConfig(**common, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                           selective=self.selective, scan_impl=self.scan_impl)

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
    ("paper", "selective_copy"): dict(seq_len=4096 + 16, n_tokens_to_copy=16, n_data_tokens=14,
                                      copy_teacher_forced=False),
    ("paper", "mqar"): dict(seq_len=512, num_kv_pairs=64, mqar_vocab_size=8192, d_model=256, n_layer=2),
    # text: 8 files (a quarter held out), rows of 64 bytes
    ("smoke", "text"): dict(seq_len=64, text_max_files=8, text_eval_fraction=0.25, d_model=32, batch_size=8,
                            learning_rate=3e-3),
    # text on 2 CPU cores, a few minutes: the first 400 stdlib files (~5 MB; 17 held out), rows of 256 bytes
    ("cpu", "text"): dict(seq_len=256, text_max_files=400, d_model=128, n_layer=2, batch_size=8, num_steps=500,
                          learning_rate=3e-3, warmup_steps=50, log_every=25, eval_every=125, eval_batches=16,
                          checkpoint_every=125),
    # text at GPU scale: the whole stdlib, byte-level, rows of 2048, a ~100M-parameter-class width
    ("paper", "text"): dict(seq_len=2048, d_model=768, n_layer=24, batch_size=32, num_steps=50_000,
                            learning_rate=6e-4, warmup_steps=1000, eval_every=2500, eval_batches=32,
                            checkpoint_every=2500),
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


def parse_run_arguments(parser, argv: Sequence[str], make_config):
    """`parser`'s flags from `argv`, the rest as ``key=value`` overrides (``--config.key=value`` too) of the
    config `make_config(args)` builds. Returns (args, config); an unknown flag, key or a bad value exits
    with argparse's usage error (status 2) naming it. Shared by the experiments' command lines."""
    args, rest = parser.parse_known_args(list(argv))
    flags = [item for item in rest if item.startswith("-") and not item.startswith("--config.")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    try:
        config = apply_overrides(make_config(args), parse_overrides(rest))
    except ValueError as error:
        parser.error(str(error))
    return args, config


def timestamped_run_dir(root: str) -> str:
    """`root`/<YYYYmmdd-HHMMSS> (local time): the default run directory of an experiment."""
    return os.path.join(root, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def config_from_dict(values: Mapping[str, Any]) -> LMConfig:
    """An LMConfig from a config.json dict (unknown keys are an error)."""
    unknown = set(values) - set(typing.get_type_hints(LMConfig))
    if unknown:
        raise ValueError(f"config_from_dict: unknown config keys {sorted(unknown)}")
    return LMConfig(**values)
