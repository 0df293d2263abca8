"""Synthetic sequence tasks of the Mamba literature, generated from (seed, split, example index).

Two tasks, both framed as next-token prediction with a loss mask on the answer positions:

* `SelectiveCopyTask` — selective copying (Gu & Dao 2023, "Mamba", arXiv 2312.00752, Sec. 4.1.1 and
  App. E.1): `n_tokens_to_copy` data tokens are scattered at random positions among noise tokens, a
  separator follows, and the model must then emit the data tokens in their order of appearance.
* `MQARTask` — multi-query associative recall (Arora et al. 2023, "Zoology", arXiv 2312.04927): key-value
  pairs, then the keys again as queries (in random order, among blank tokens); after each query key the
  model must emit the value that was paired with that key.

Each example is a dict of numpy arrays, all of shape (seq_len,):

* ``inputs``:    int32 token ids,
* ``targets``:   int32 next-token targets (``targets[t] == full[t + 1]`` where ``inputs == full[:-1]``),
* ``loss_mask``: bool, True exactly at the answer positions (where ``targets`` is a copied data token or a
  recalled value); accuracy and loss are measured there only.

Examples are pure functions of ``(seed, split, index)`` (numpy `SeedSequence`), so any example — and any
batch of a `grain.MapDataset` built by `make_dataset` — can be regenerated exactly, which makes resuming
a training run exact without storing a data-iterator state.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Union

import grain
import numpy as np

Example = Dict[str, np.ndarray]

SPLITS = {"train": 0, "eval": 1, "test": 2}


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive int; got {value!r}")


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The numpy Generator of one example: a pure function of (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"example_rng: `split` must be one of {sorted(SPLITS)}; got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"example_rng: `seed` must be a non-negative int; got {seed!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"example_rng: `index` must be a non-negative int; got {index!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


def _lm_example(full: np.ndarray, answer_positions: np.ndarray) -> Example:
    """Split a full sequence (L + 1,) into inputs/targets (L,) with a mask at `answer_positions`."""
    seq_len = full.shape[0] - 1
    loss_mask = np.zeros(seq_len, dtype=bool)
    loss_mask[answer_positions] = True
    return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
            "loss_mask": loss_mask}


@dataclasses.dataclass(frozen=True)
class SelectiveCopyTask:
    """Selective copying, as a next-token task.

    The full sequence has ``seq_len + 1`` tokens::

        [noise region: seq_len - n_tokens_to_copy tokens, holding the data tokens at random positions]
        [SEP] [d_1 ... d_n_tokens_to_copy]

    ``inputs = full[:-1]``, ``targets = full[1:]``; the loss mask marks the ``n_tokens_to_copy`` positions
    from the separator on, whose targets are d_1 ... d_n. Token ids: 0 = noise, 1 = separator (marker),
    2 .. 2 + n_data_tokens - 1 = data.

    ``teacher_forced=True`` (the default) feeds the answer back: the model sees d_1..d_{j-1} when predicting
    d_j. ``teacher_forced=False`` is the Mamba paper's version (its Figure 2): the answer region of the
    inputs holds only markers, ``[noise region][SEP × n_tokens_to_copy]``, so every data token must be
    recalled from the state, none can be read off the previous answer.

    Args:
      seq_len: L, the length of `inputs`/`targets`; needs L >= 2 * n_tokens_to_copy.
      n_tokens_to_copy: how many data tokens to memorise (the paper: 16).
      n_data_tokens: how many distinct data token values (the paper: 14, i.e. vocab 16 with noise and
        marker). Data tokens are drawn uniformly, with repetition.
      teacher_forced: whether the inputs' answer region holds the answer so far (see above).
    """

    seq_len: int = 64
    n_tokens_to_copy: int = 8
    n_data_tokens: int = 8
    teacher_forced: bool = True

    NOISE = 0
    SEPARATOR = 1
    FIRST_DATA_TOKEN = 2

    def __post_init__(self):
        for name in ("seq_len", "n_tokens_to_copy", "n_data_tokens"):
            _positive_int("SelectiveCopyTask", name, getattr(self, name))
        if not isinstance(self.teacher_forced, (bool, np.bool_)):
            raise ValueError(f"SelectiveCopyTask: `teacher_forced` must be a bool; got {self.teacher_forced!r}")
        if self.seq_len < 2 * self.n_tokens_to_copy:
            raise ValueError(
                f"SelectiveCopyTask: `n_tokens_to_copy`={self.n_tokens_to_copy} is too many for "
                f"`seq_len`={self.seq_len}: the noise region (seq_len - n_tokens_to_copy) must hold all "
                f"data tokens, so seq_len >= 2 * n_tokens_to_copy")

    @property
    def vocab_size(self) -> int:
        """Noise + separator + data tokens."""
        return self.n_data_tokens + 2

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing a data token uniformly at each answer position."""
        return 1.0 / self.n_data_tokens

    @property
    def noise_region_len(self) -> int:
        return self.seq_len - self.n_tokens_to_copy

    def generate(self, rng: np.random.Generator) -> Example:
        """One example (dict of (seq_len,) arrays) drawn with `rng`."""
        m, region = self.n_tokens_to_copy, self.noise_region_len
        data = rng.integers(self.FIRST_DATA_TOKEN, self.FIRST_DATA_TOKEN + self.n_data_tokens, size=m)
        positions = np.sort(rng.choice(region, size=m, replace=False))
        full = np.full(self.seq_len + 1, self.NOISE, dtype=np.int64)
        full[positions] = data
        full[region] = self.SEPARATOR
        full[region + 1:] = data
        example = _lm_example(full, np.arange(region, region + m))
        if not self.teacher_forced:
            example["inputs"][region:] = self.SEPARATOR
        return example

    def example(self, seed: int, index: int, split: str = "train") -> Example:
        """Example `index` of `split` for `seed` (deterministic)."""
        return self.generate(example_rng(seed, split, index))


@dataclasses.dataclass(frozen=True)
class MQARTask:
    """Multi-query associative recall (Zoology's MQAR), as a next-token task.

    The full sequence has ``seq_len + 1`` tokens::

        [k_1 v_1 k_2 v_2 ... k_N v_N] [query region: blanks, with every key k_j followed by v_j, in random
                                       order, at random even offsets]

    Keys are distinct draws from ``1 .. vocab_size // 2 - 1``, values distinct draws from
    ``vocab_size // 2 .. vocab_size - 1``; 0 is the blank. ``inputs = full[:-1]``, ``targets =
    full[1:]``; the loss mask marks the N query-key positions, whose targets are the paired values.
    Query slots are drawn as in Zoology: without replacement from ``(seq_len + 1 - 2N) // 2`` slots with
    probability ∝ ``power_a * i ** (power_a - 1)`` (slot i = 1, 2, ...); ``power_a = 0.01`` (Zoology's
    default) favours early slots, ``power_a = 1`` is uniform.

    Args:
      seq_len: L, the length of `inputs`/`targets`; needs L + 1 >= 4 * num_kv_pairs.
      num_kv_pairs: N, the number of key-value pairs (all of them are queried).
      vocab_size: total vocabulary; needs N <= vocab_size // 2 - 1.
      power_a: the query-slot power law exponent, in (0, 1].
    """

    seq_len: int = 64
    num_kv_pairs: int = 8
    vocab_size: int = 64
    power_a: float = 0.01

    BLANK = 0

    def __post_init__(self):
        for name in ("seq_len", "num_kv_pairs", "vocab_size"):
            _positive_int("MQARTask", name, getattr(self, name))
        if not 0.0 < float(self.power_a) <= 1.0:
            raise ValueError(f"MQARTask: `power_a` must be in (0, 1]; got {self.power_a!r}")
        n = self.num_kv_pairs
        if self.seq_len + 1 < 4 * n:
            raise ValueError(
                f"MQARTask: `num_kv_pairs`={n} is too many for `seq_len`={self.seq_len}: the context takes "
                f"2N tokens and the queries 2N more, so seq_len + 1 >= 4 * num_kv_pairs")
        if n > self.num_keys:
            raise ValueError(
                f"MQARTask: `vocab_size`={self.vocab_size} is too small for `num_kv_pairs`={n}: keys are "
                f"distinct tokens in 1 .. vocab_size // 2 - 1, so vocab_size >= 2 * (num_kv_pairs + 1)")

    @property
    def num_keys(self) -> int:
        return self.vocab_size // 2 - 1

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing a value uniformly at each query."""
        return 1.0 / self.num_values

    @property
    def num_query_slots(self) -> int:
        return (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2

    def query_slot_probabilities(self) -> np.ndarray:
        """(num_query_slots,) float64, Zoology's power law over query slots, summing to 1."""
        a = float(self.power_a)
        p = a * np.arange(1, self.num_query_slots + 1, dtype=np.float64) ** (a - 1.0)
        return p / p.sum()

    def generate(self, rng: np.random.Generator) -> Example:
        """One example (dict of (seq_len,) arrays) drawn with `rng`."""
        n, half = self.num_kv_pairs, self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), size=n, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), size=n, replace=False)
        slots = rng.choice(self.num_query_slots, size=n, replace=False, p=self.query_slot_probabilities())
        full = np.full(self.seq_len + 1, self.BLANK, dtype=np.int64)
        full[0:2 * n:2] = keys
        full[1:2 * n:2] = values
        query_positions = 2 * n + 2 * slots
        full[query_positions] = keys
        full[query_positions + 1] = values
        return _lm_example(full, np.sort(query_positions))

    def example(self, seed: int, index: int, split: str = "train") -> Example:
        """Example `index` of `split` for `seed` (deterministic)."""
        return self.generate(example_rng(seed, split, index))


Task = Union[SelectiveCopyTask, MQARTask]

TASKS = {"selective_copy": SelectiveCopyTask, "mqar": MQARTask}


def make_task(name: str, **kwargs) -> Task:
    """Build a task by name ("selective_copy" or "mqar") from its keyword arguments."""
    if name not in TASKS:
        raise ValueError(f"make_task: `name` must be one of {sorted(TASKS)}; got {name!r}")
    return TASKS[name](**kwargs)


class _ExampleAt:
    """grain map: example index -> example of (task, seed, split). A picklable callable (no lambdas)."""

    def __init__(self, task: Task, seed: int, split: str):
        example_rng(seed, split, 0)  # validate seed and split once, early
        self.task, self.seed, self.split = task, seed, split

    def __call__(self, index) -> Example:
        return self.task.example(self.seed, int(index), self.split)


def make_dataset(task: Task, *, seed: int, batch_size: int, num_batches: int,
                 split: str = "train") -> grain.MapDataset:
    """An indexable, finite `grain.MapDataset` of batches: ``dataset[i]`` is batch i.

    Batch i holds examples ``i * batch_size .. (i + 1) * batch_size - 1`` of (task, seed, split), each a
    dict of arrays: ``inputs``/``targets`` (batch_size, seq_len) int32, ``loss_mask`` (batch_size,
    seq_len) bool. Indexing is random access, so a run resumed at step k reads batch k with no state.
    """
    _positive_int("make_dataset", "batch_size", batch_size)
    _positive_int("make_dataset", "num_batches", num_batches)
    return (grain.MapDataset.source(range(batch_size * num_batches))
            .map(_ExampleAt(task, seed, split))
            .batch(batch_size, drop_remainder=True))


def get_batch(dataset: grain.MapDataset, index: int) -> Example:
    """Batch `index` of a dataset from `make_dataset` (the batch of training step `index`)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(dataset):
        raise ValueError(f"get_batch: `index` must be an int in [0, {len(dataset)}); got {index!r}")
    return dataset[int(index)]
