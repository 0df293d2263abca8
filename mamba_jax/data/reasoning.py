"""A verifiable reasoning task that works offline: chains of signed integer additions and subtractions
(optionally with products), solved step by step, with a binary correctness reward — the M1 pipeline's
stand-in for math problems (Wang et al. 2025, arXiv 2504.10449: SFT on solutions, then GRPO with a reward
of 1 for a correct final answer and 0 otherwise).

One problem, as text (`ALPHABET` holds every character)::

    prompt      12-7*3+45=
    completion  7*3=21;12-21=-9;-9+45=36;#36

Products are evaluated first (left to right), then the sum left to right, one binary operation per
step ``a<op>b=c;``; the final answer follows the marker ``#``. `reward(completion, answer)` is 1.0 only
for a well-formed completion (steps of that shape, then ``#`` and an integer written canonically, nothing
after) whose answer equals the true one; 0.0 for a wrong, missing or malformed answer — nothing partial.

Problems are pure functions of (task, seed, split, index) and the split of a problem is a hash of its
prompt, so the train and eval splits are disjoint by construction (no eval prompt can be drawn for
training, whatever the seeds). `sft_rows` packs prompt + completion documents into rows whose loss covers
the completion and EOS only (documents never straddle rows); `prompt_batch` left-pads prompts for
`mamba_jax.inference.generate`; `majority_vote` is self-consistency's aggregation. The functions that
take a tokenizer `tok` accept any with the `ByteTokenizer` interface (`tokenizer()` here, or an
`HFTokenizer` of a real checkpoint, whose subwords the prompt and completion are encoded into apart).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mamba_jax.data.synthetic import example_rng
from mamba_jax.data.text import CharTokenizer, Rows, pack_documents

ALPHABET = "0123456789+-*=;#"
MARKER = "#"
SPLITS = ("train", "eval")

_INT = r"(?:0|-?[1-9][0-9]*)"                       # canonical: no leading zeros, no "-0"
_STEP = rf"{_INT}[-+*]{_INT}={_INT};"
_COMPLETION = re.compile(rf"(?:{_STEP})*{MARKER}({_INT})")


def tokenizer() -> CharTokenizer:
    """The task's character tokenizer (16 characters + BOS, EOS, PAD: vocabulary 19)."""
    return CharTokenizer(ALPHABET)


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str        # e.g. "12-7*3+45="
    completion: str    # e.g. "7*3=21;12-21=-9;-9+45=36;#36"
    answer: int


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive int; got {value!r}")


def split_of_prompt(prompt: str, eval_fraction: float) -> str:
    """"eval" or "train" for a problem, from a stable hash of its prompt (the same on every machine)."""
    h = int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8], 16)
    return "eval" if h / 2 ** 32 < eval_fraction else "train"


def solve(first: int, terms: Sequence[Tuple[str, Tuple[int, ...]]]) -> Problem:
    """The problem ``first (op factors)...`` and its step-by-step solution.

    first: the first term (any sign); terms: (op in "+-", factors) with one factor (a plain term) or two
    (a product ``a*b``), each factor >= 0.
    """
    prompt = str(first) + "".join(op + "*".join(map(str, f)) for op, f in terms) + "="
    steps, values = [], []
    for _, factors in terms:                                   # products first, left to right
        value = factors[0]
        for f in factors[1:]:
            steps.append(f"{value}*{f}={value * f}")
            value *= f
        values.append(value)
    total = first
    for (op, _), value in zip(terms, values):                  # then the sum, left to right
        new = total + value if op == "+" else total - value
        steps.append(f"{total}{op}{value}={new}")
        total = new
    return Problem(prompt, "".join(s + ";" for s in steps) + MARKER + str(total), total)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Difficulty knobs of the problems.

    min_terms, max_terms: terms per problem (uniform), >= 2; max_digits: digits of a plain term (1 ..
    max_digits, uniform); the first term is negative with probability `negative_first`; each later term is
    a product of two factors of 1 .. `product_digits` digits with probability `product_prob`;
    eval_fraction: the share of the problem space held out (by hash of the prompt).
    """
    min_terms: int = 2
    max_terms: int = 4
    max_digits: int = 2
    negative_first: float = 0.25
    product_prob: float = 0.0
    product_digits: int = 1
    eval_fraction: float = 0.1

    def __post_init__(self):
        for name in ("min_terms", "max_terms", "max_digits", "product_digits"):
            _positive_int("ArithmeticTask", name, getattr(self, name))
        if self.min_terms < 2 or self.max_terms < self.min_terms:
            raise ValueError(f"ArithmeticTask: need 2 <= `min_terms` <= `max_terms`; got {self.min_terms}, "
                             f"{self.max_terms}")
        for name in ("negative_first", "product_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ArithmeticTask: `{name}` must be in [0, 1]; got {getattr(self, name)!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"ArithmeticTask: `eval_fraction` must be in (0, 1); got {self.eval_fraction!r}")

    def _largest_term(self) -> int:
        plain = 10 ** self.max_digits - 1
        return max(plain, (10 ** self.product_digits - 1) ** 2) if self.product_prob > 0 else plain

    @property
    def max_prompt_chars(self) -> int:
        """An upper bound on a prompt's length in characters (the "=" included)."""
        term = max(self.max_digits, 2 * self.product_digits + 1) if self.product_prob > 0 else self.max_digits
        return (self.max_digits + 1) + (self.max_terms - 1) * (1 + term) + 1

    @property
    def max_completion_chars(self) -> int:
        """An upper bound on a completion's length in characters (every step and the final answer)."""
        largest = self._largest_term()
        total = len(str(10 ** self.max_digits - 1 + (self.max_terms - 1) * largest)) + 1    # a signed running total
        sums = (self.max_terms - 1) * (2 * total + len(str(largest)) + 3)
        products = (self.max_terms - 1) * (4 * self.product_digits + 3) if self.product_prob > 0 else 0
        return sums + products + 1 + total

    def _number(self, rng: np.random.Generator, max_digits: int) -> int:
        digits = int(rng.integers(1, max_digits + 1))
        return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))

    def draw(self, rng: np.random.Generator) -> Problem:
        """A random problem of either split."""
        n_terms = int(rng.integers(self.min_terms, self.max_terms + 1))
        first = self._number(rng, self.max_digits)
        if first and rng.random() < self.negative_first:
            first = -first
        terms = []
        for _ in range(n_terms - 1):
            op = "+" if rng.random() < 0.5 else "-"
            if rng.random() < self.product_prob:
                factors = (self._number(rng, self.product_digits), self._number(rng, self.product_digits))
            else:
                factors = (self._number(rng, self.max_digits),)
            terms.append((op, factors))
        return solve(first, terms)

    def problem(self, seed: int, index: int, split: str = "train") -> Problem:
        """Problem `index` of `split` ("train" or "eval") for `seed`: a pure function of its arguments;
        draws until the prompt's hash falls in `split` (so the splits never share a prompt)."""
        if split not in SPLITS:
            raise ValueError(f"ArithmeticTask.problem: `split` must be one of {SPLITS}; got {split!r}")
        rng = example_rng(seed, split, index)
        for _ in range(100_000):
            p = self.draw(rng)
            if split_of_prompt(p.prompt, self.eval_fraction) == split:
                return p
        raise ValueError(f"ArithmeticTask.problem: no {split} problem in 100000 draws (eval_fraction="
                         f"{self.eval_fraction})")

    def problems(self, seed: int, n: int, split: str = "train", *, distinct: bool = False) -> List[Problem]:
        """Problems 0 .. n-1 of `split` (with `distinct`, the first n distinct prompts: a held-out set with
        no repeats; ValueError when the problem space is too small for n)."""
        _positive_int("ArithmeticTask.problems", "n", n)
        if not distinct:
            return [self.problem(seed, i, split) for i in range(n)]
        out, seen, index = [], set(), 0
        while len(out) < n:
            if index >= 20 * n + 1000:
                raise ValueError(f"ArithmeticTask.problems: only {len(out)} distinct {split} problems in {index} "
                                 f"draws; asked for n={n} (raise max_digits or max_terms)")
            p = self.problem(seed, index, split)
            index += 1
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return out


def parse_answer(completion: str) -> Optional[int]:
    """The final answer of a well-formed completion (steps ``a<op>b=c;`` then ``#`` and a canonical
    integer, nothing after), else None."""
    if not isinstance(completion, str):
        raise ValueError(f"parse_answer: `completion` must be a str; got {type(completion).__name__}")
    m = _COMPLETION.fullmatch(completion)
    return None if m is None else int(m.group(1))


def reward(completion: str, answer: int) -> float:
    """1.0 for a well-formed completion whose final answer equals `answer`; 0.0 otherwise (wrong, missing
    or malformed answer, text after it). Binary, as M1's correctness reward."""
    return 1.0 if parse_answer(completion) == int(answer) else 0.0


def majority_vote(answers: Sequence[Optional[int]]) -> Optional[int]:
    """The most frequent answer among `answers`, None (unparsable) ignored; ties go to the answer seen
    first; None when no answer parses."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def sft_rows(problems: Sequence[Problem], tok, seq_len: int) -> Rows:
    """Prompt + completion documents packed into rows (see `pack_documents`): BOS, the prompt, the
    completion, EOS as the last target; ``loss_mask`` True on the completion's targets and EOS only, and
    no document straddles two rows. Raises ValueError when a problem does not fit `seq_len`."""
    prompts = [tok.encode(p.prompt) for p in problems]     # apart: a subword tokenizer must not merge across
    docs = [np.concatenate([q, tok.encode(p.completion)]) for q, p in zip(prompts, problems)]
    return pack_documents(docs, seq_len, tok.eos_id, tok.pad_id, bos_id=tok.bos_id,
                          prompt_lengths=[q.size for q in prompts], split_documents=False)


def prompt_batch(prompts: Sequence[str], tok, length: Optional[int] = None):
    """Prompts as one left-padded batch for `generate`: (ids (n, L) int32, mask (n, L) int32), each row
    BOS + the prompt, padded on the left with PAD (mask 0). L: `length` or the longest row."""
    rows = [np.concatenate([np.int32([tok.bos_id]), tok.encode(p)]) for p in prompts]
    longest = max(r.size for r in rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"prompt_batch: `length`={length} is shorter than the longest prompt ({longest} tokens "
                         "with BOS)")
    ids = np.full((len(rows), length), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - r.size:] = r
        mask[i, length - r.size:] = 1
    return ids, mask


def completion_texts(tokens, tok) -> List[Optional[str]]:
    """Generated tokens (n, T) → the text of each row before its first EOS, or None for a row with no EOS
    (a completion cut by the length limit has no final answer: its reward is 0)."""
    tokens = np.asarray(tokens)
    out = []
    for row in tokens:
        ends = np.flatnonzero(row == tok.eos_id)
        out.append(None if ends.size == 0 else tok.decode(row[:ends[0]]))
    return out


def completion_rewards(tokens, answers: Sequence[int], tok) -> np.ndarray:
    """(n,) float32 rewards of generated tokens (n, T) against the true `answers` (n,): `reward` of each
    row's text before EOS; 0 for a row without EOS."""
    texts = completion_texts(tokens, tok)
    if len(texts) != len(answers):
        raise ValueError(f"completion_rewards: {len(texts)} rows of tokens but {len(answers)} answers")
    return np.asarray([0.0 if t is None else reward(t, a) for t, a in zip(texts, answers)], np.float32)
