"""Real-text language modelling data: files → documents → tokens → packed rows → a grain pipeline.

The text needs no download: the default corpus is the Python standard library's own sources
(`sysconfig.get_paths()["stdlib"]`, ~1,800 files, ~31 MB without site-packages), present on every machine.

Pipeline (each stage a small pure function):

1. `text_files(root, pattern, max_files)` → sorted paths; `read_documents(paths)` → one str per file.
2. A tokenizer: `ByteTokenizer` (the default; vocab = 256 byte values + BOS, EOS, PAD) or a BPE trained
   locally with the `tokenizers` library (`train_bpe_tokenizer`, saved/loaded as tokenizer.json). Both
   have `encode(str) -> (n,) int32`, `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`.
3. `pack_documents(token_arrays, seq_len, eos_id, pad_id, bos_id=None)` → rows (see its docstring for the
   exact framing: every document ends with EOS as its last *target*, no target crosses documents,
   `seq_idx` numbers the documents within a row so the model's scan state resets between them).
4. `text_dataset(rows, seed=..., batch_size=...)`: `grain.MapDataset` source → shuffle(seed) → this
   process's shard → repeat (reshuffled each epoch) → batch. Random access (`dataset[step]`) and a
   checkpointable iterator (`get_state()` / `set_state()`) both resume exactly.
5. `packed_text_rows(...)` memoises the packed rows of a corpus on disk (.npz keyed by the corpus, the
   tokenizer and seq_len); `TextLMData` bundles rows + tokenizer + pipeline for a training run.

Batches are dicts of numpy arrays, all (batch_size, seq_len): ``input_ids`` int32, ``targets`` int32,
``loss_mask`` bool, ``seq_idx`` int32 — pass ``seq_idx`` to the model (`MambaLM(...)(input_ids,
seq_idx=seq_idx)`) so that packed documents do not see each other.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from typing import Dict, List, Optional, Sequence

import grain
import numpy as np

from mamba_jax.ops._checks import check_token_ids

Rows = Dict[str, np.ndarray]

ROW_KEYS = ("input_ids", "targets", "loss_mask", "seq_idx")
DEFAULT_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__")
SPLITS = ("all", "train", "eval")


# ----------------------------------------------------------------------------------------------- checks
def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _positive_int(owner: str, name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive int; got {value!r}")


def _non_negative_int(owner: str, name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{owner}: `{name}` must be a non-negative int; got {value!r}")


# ----------------------------------------------------------------------------------- 1. document source
def default_text_root() -> str:
    """The Python standard library's source folder (real text present on every machine)."""
    return sysconfig.get_paths()["stdlib"]


def text_files(root: Optional[str] = None, pattern: str = "*.py", max_files: Optional[int] = None, *,
               exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS) -> List[str]:
    """Paths of the files under `root` whose name matches `pattern`, sorted by path relative to `root`.

    Args:
      root: a folder (default: `default_text_root()`, the standard library).
      pattern: an `fnmatch` pattern on the file name ("*.py", "*.rst", "*").
      max_files: keep the first `max_files` paths of the sorted list (None: all).
      exclude_dirs: folder names not descended into (default: installed packages and byte-code caches,
        so the default corpus is the standard library itself).
    Returns:
      a non-empty list of absolute paths, in a deterministic (sorted) order.
    """
    root = default_text_root() if root is None else root
    if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
        raise ValueError(f"text_files: `root` must be an existing folder; got {root!r}")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"text_files: `pattern` must be a non-empty fnmatch pattern such as '*.py'; got {pattern!r}")
    if max_files is not None:
        _positive_int("text_files", "max_files", max_files)
    root = os.path.abspath(os.fspath(root))
    excluded = set(exclude_dirs)
    relative = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in excluded]
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if fnmatch.fnmatch(name, pattern) and os.path.isfile(os.path.join(folder, name)):
                relative.append(os.path.normpath(os.path.join(rel_folder, name)))
    relative.sort()
    if not relative:
        raise ValueError(f"text_files: no file under `root`={root!r} matches `pattern`={pattern!r}")
    if max_files is not None:
        relative = relative[:max_files]
    return [os.path.join(root, r) for r in relative]


def read_documents(paths: Sequence[str]) -> List[str]:
    """The text of each file (utf-8; undecodable bytes become U+FFFD), in the order of `paths`."""
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ValueError(f"read_documents: `paths` must be a sequence of file paths; got {type(paths).__name__}")
    documents = []
    for path in paths:
        with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
            documents.append(f.read())
    return documents


def split_of(relative_path: str, eval_fraction: float) -> str:
    """"eval" or "train" for a document, from a stable hash of its path (the same on every machine)."""
    h = int(hashlib.sha1(relative_path.replace(os.sep, "/").encode("utf-8")).hexdigest()[:8], 16)
    return "eval" if h / 2 ** 32 < eval_fraction else "train"


# ------------------------------------------------------------------------------------------ 2. tokenizers
def _ids_to_decode(owner: str, ids, vocab_size: int) -> np.ndarray:
    """`ids` as a 1-D int array in [0, vocab_size); ValueError naming `owner` otherwise."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{owner}: `ids` must be a 1-D int array; got shape {ids.shape}, dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{owner}: `ids` must lie in [0, {vocab_size}); got [{ids.min()}, {ids.max()}]")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the byte values, then BOS = 256, EOS = 257, PAD = 258.

    Needs nothing; every string round-trips exactly (`decode(encode(s)) == s`).
    """

    name = "byte"
    BOS, EOS, PAD = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def fingerprint(self) -> str:
        """A string that identifies the tokenizer's mapping (part of the packed-rows cache key)."""
        return "byte-v1"

    def encode(self, text: str) -> np.ndarray:
        """(n,) int32 byte values of `text` encoded as utf-8 (no special tokens added)."""
        if not isinstance(text, str):
            raise ValueError(f"ByteTokenizer.encode: `text` must be a str; got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """The text of `ids` (1-D ints); special tokens are dropped, invalid utf-8 becomes U+FFFD."""
        ids = _ids_to_decode("ByteTokenizer.decode", ids, self.vocab_size)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per character of a fixed alphabet, then BOS, EOS, PAD: ids 0..len(alphabet)-1 are the
    characters in `alphabet` order, BOS = len(alphabet), EOS = +1, PAD = +2.

    For small synthetic languages (e.g. `mamba_jax.data.reasoning`): `encode` raises ValueError naming
    the first character outside the alphabet; `decode` drops the special tokens.
    """

    name = "char"

    def __init__(self, alphabet: str):
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"CharTokenizer: `alphabet` must be a non-empty str of distinct characters; got "
                             f"{alphabet!r}")
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    @property
    def bos_id(self) -> int:
        return len(self.alphabet)

    @property
    def eos_id(self) -> int:
        return len(self.alphabet) + 1

    @property
    def pad_id(self) -> int:
        return len(self.alphabet) + 2

    @property
    def fingerprint(self) -> str:
        return "char-v1:" + hashlib.sha1(self.alphabet.encode("utf-8")).hexdigest()[:12]

    def encode(self, text: str) -> np.ndarray:
        """(n,) int32 ids of the characters of `text` (no special tokens added)."""
        if not isinstance(text, str):
            raise ValueError(f"CharTokenizer.encode: `text` must be a str; got {type(text).__name__}")
        try:
            return np.fromiter((self._ids[c] for c in text), np.int32, len(text))
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: {e.args[0]!r} (at {text.index(e.args[0])}) is not in the "
                             f"alphabet {self.alphabet!r}") from None

    def decode(self, ids) -> str:
        """The text of `ids` (1-D ints in [0, vocab_size)); special tokens are dropped."""
        ids = _ids_to_decode("CharTokenizer.decode", ids, self.vocab_size)
        return "".join(self.alphabet[i] for i in ids.tolist() if i < len(self.alphabet))


BPE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


def _require_tokenizers(owner: str):
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - the library is installed in this project's env
        raise ImportError(f"{owner} needs the optional dependency `tokenizers` (pip install tokenizers)") from e
    return tokenizers


class BPETokenizer:
    """A byte-level BPE tokenizer (the `tokenizers` library), with the `ByteTokenizer` interface.

    Specials: BOS, EOS, PAD are ids 0, 1, 2. Text that happens to spell a special token is encoded as
    plain text (never as the special id), so EOS only ever marks a document end. Round-trips exactly.
    Build it with `train_bpe_tokenizer`, or load a tokenizer.json with `BPETokenizer.load(path)`.
    """

    name = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True
        ids = [tokenizer.token_to_id(t) for t in BPE_SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"BPETokenizer: `tokenizer` must define the special tokens {BPE_SPECIAL_TOKENS}")
        self._bos, self._eos, self._pad = ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        """(n,) int32 token ids of `text` (no special tokens added)."""
        if not isinstance(text, str):
            raise ValueError(f"BPETokenizer.encode: `text` must be a str; got {type(text).__name__}")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        """`encode` of each text, in parallel (the library's Rust threads)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        """The text of `ids` (1-D ints); special tokens are dropped."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"BPETokenizer.decode: `ids` must be a 1-D int array; got shape {ids.shape}")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str) -> str:
        """Write tokenizer.json (`path` is the file, or a folder to hold tokenizer.json); returns the file."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._tok.save(path)
        return path

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        """Read a tokenizer.json written by `save` (`path`: the file or its folder)."""
        tokenizers = _require_tokenizers("BPETokenizer.load")
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"BPETokenizer.load: `path` must be a tokenizer.json file or its folder; got {path!r}")
        return cls(tokenizers.Tokenizer.from_file(path))


class HFTokenizer(BPETokenizer):
    """The tokenizer of a Hugging Face checkpoint folder, with the `ByteTokenizer` interface: its
    tokenizer.json (the `tokenizers` library) and the ids of BOS / EOS / PAD from its config.json
    (`bos_token_id`, `eos_token_id` — the first one when a list —, `pad_token_id`, else EOS). `vocab_size`
    is the model's (config.json) when it is larger than the tokenizer's own."""

    name = "hf"

    def __init__(self, tokenizer, *, bos_id: int, eos_id: int, pad_id: Optional[int] = None,
                 vocab_size: Optional[int] = None):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"HFTokenizer: `{name}` must be an int >= 0; got {value!r}")
        self._bos, self._eos = int(bos_id), int(eos_id)
        self._pad = self._eos if pad_id is None else int(pad_id)
        self._vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), int(vocab_size or 0))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @classmethod
    def load(cls, path: str) -> "HFTokenizer":
        """Read `path`/tokenizer.json and the special ids of `path`/config.json."""
        tokenizers = _require_tokenizers("HFTokenizer.load")
        files = [os.path.join(path, name) for name in ("tokenizer.json", "config.json")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"HFTokenizer.load: `path` must be a checkpoint folder with tokenizer.json and "
                             f"config.json; missing {missing}")
        with open(files[1]) as f:
            config = json.load(f)
        first = lambda v: v[0] if isinstance(v, list) and v else v  # noqa: E731
        bos, eos = first(config.get("bos_token_id")), first(config.get("eos_token_id"))
        if bos is None or eos is None:
            raise ValueError(f"HFTokenizer.load: {files[1]} must give `bos_token_id` and `eos_token_id`; got "
                             f"{bos!r}, {eos!r}")
        return cls(tokenizers.Tokenizer.from_file(files[0]), bos_id=bos, eos_id=eos,
                   pad_id=first(config.get("pad_token_id")), vocab_size=config.get("vocab_size"))


def train_bpe_tokenizer(documents: Sequence[str], vocab_size: int, *, min_frequency: int = 2,
                        path: Optional[str] = None) -> BPETokenizer:
    """Train a byte-level BPE on `documents` (locally, with the `tokenizers` library).

    Args:
      documents: the training texts.
      vocab_size: the target vocabulary, specials included; at least 259 (256 byte symbols + 3 specials).
        The result may be smaller when the documents do not support that many merges.
      min_frequency: a pair must occur this often to be merged.
      path: when given, also save tokenizer.json there (a file path or a folder).
    """
    tokenizers = _require_tokenizers("train_bpe_tokenizer")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents \
            or not all(isinstance(d, str) for d in documents):
        raise ValueError("train_bpe_tokenizer: `documents` must be a non-empty sequence of str")
    if not _is_int(vocab_size) or vocab_size < 256 + len(BPE_SPECIAL_TOKENS):
        raise ValueError(f"train_bpe_tokenizer: `vocab_size` must be an int >= {256 + len(BPE_SPECIAL_TOKENS)} "
                         f"(256 byte symbols + {len(BPE_SPECIAL_TOKENS)} specials); got {vocab_size!r}")
    _positive_int("train_bpe_tokenizer", "min_frequency", min_frequency)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(documents), trainer)
    result = BPETokenizer(tok)
    if path is not None:
        result.save(path)
    return result


def encode_documents(tokenizer, documents: Sequence[str]) -> List[np.ndarray]:
    """(n_i,) int32 token ids of each document (batched when the tokenizer has `encode_batch`)."""
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(documents)
    return [tokenizer.encode(d) for d in documents]


# ---------------------------------------------------------------------------------------------- 3. packing
def pack_documents(token_arrays: Sequence[np.ndarray], seq_len: int, eos_id: int, pad_id: int, *,
                   bos_id: Optional[int] = None, prompt_lengths: Optional[Sequence[int]] = None,
                   split_documents: bool = True) -> Rows:
    """Pack tokenized documents into rows of `seq_len` by greedy concatenation (no document dropped).

    Framing of one document with tokens d_0 .. d_{n-1}:

        inputs  = [BOS] d_0 d_1 ... d_{n-1}        (BOS only when `bos_id` is given)
        targets =       d_0 d_1 ... d_{n-1} EOS    (the next token; the last target is EOS)

    so every target lies inside its own document: the model is never asked to predict one document from
    another. The (input, target) pairs of all documents are concatenated in order and cut into rows of
    `seq_len`. With `split_documents` (the default) a document longer than the space left in a row
    continues at the start of the next row and only the last row is padded; without it, a document that
    does not fit the rest of a row starts the next one and the rest of the row is padding (a document
    must then fit one row: its prompt is never cut from its completion). Without `bos_id`, an empty
    document has no input token and contributes nothing.

    Args:
      token_arrays: 1-D int arrays, one per document (no specials inside).
      seq_len: row length L.
      eos_id, pad_id: the tokenizer's end-of-document and padding ids; bos_id: optional start id.
      prompt_lengths: optional, one int per document: its first `prompt_lengths[i]` tokens are a prompt
        that is read but not predicted (supervised fine-tuning on completions): their targets get
        ``loss_mask`` False. The completion's tokens and the final EOS are predicted.
      split_documents: whether a document may continue on the next row (see above).
    Returns:
      a dict of arrays, each (rows, L):
        input_ids int32, targets int32,
        loss_mask bool — False at padding and at prompt targets, True at every other target,
        seq_idx int32 — the document number within the row, 0 at the start of each row, +1 at each
          document boundary; padding takes the next number, so no state leaks into it.
    """
    if isinstance(token_arrays, np.ndarray) or not isinstance(token_arrays, Sequence):
        raise ValueError(f"pack_documents: `token_arrays` must be a sequence of 1-D int arrays; got "
                         f"{type(token_arrays).__name__}")
    _positive_int("pack_documents", "seq_len", seq_len)
    _non_negative_int("pack_documents", "eos_id", eos_id)
    _non_negative_int("pack_documents", "pad_id", pad_id)
    if bos_id is not None:
        _non_negative_int("pack_documents", "bos_id", bos_id)
    if not isinstance(split_documents, bool):
        raise ValueError(f"pack_documents: `split_documents` must be a bool; got {split_documents!r}")
    if prompt_lengths is not None:
        if len(prompt_lengths) != len(token_arrays):
            raise ValueError(f"pack_documents: `prompt_lengths` needs one int per document ({len(token_arrays)}); "
                             f"got {len(prompt_lengths)}")
        for i, n in enumerate(prompt_lengths):
            _non_negative_int("pack_documents", f"prompt_lengths[{i}]", n)
    blocks = []      # (inputs, targets, loss) per document, padding blocks between rows when not splitting
    fill = 0
    for i, tokens in enumerate(token_arrays):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(f"pack_documents: `token_arrays[{i}]` must be a 1-D int array; got shape "
                             f"{tokens.shape}, dtype {tokens.dtype}")
        if tokens.size and tokens.min() < 0:
            raise ValueError(f"pack_documents: `token_arrays[{i}]` holds the id {int(tokens.min())} at position "
                             f"{int(np.argmin(tokens))}; token ids are >= 0")
        tokens = tokens.astype(np.int32)
        x = tokens if bos_id is None else np.concatenate([np.int32([bos_id]), tokens])
        if x.size == 0:
            continue
        t = np.concatenate([x[1:], np.int32([eos_id])])
        # target j is document token j (with BOS) or j + 1 (without); EOS counts as token n
        target_index = np.arange(x.size) + (0 if bos_id is not None else 1)
        if prompt_lengths is not None and prompt_lengths[i] > tokens.size:
            raise ValueError(f"pack_documents: `prompt_lengths[{i}]`={prompt_lengths[i]} exceeds the document's "
                             f"{tokens.size} tokens")
        loss = np.ones(x.size, bool) if prompt_lengths is None else target_index >= prompt_lengths[i]
        if not split_documents:
            if x.size > seq_len:
                raise ValueError(f"pack_documents: document {i} needs {x.size} positions, more than `seq_len`="
                                 f"{seq_len} (split_documents=False keeps each document in one row)")
            if fill + x.size > seq_len:
                blocks.append(None)          # padding to the end of the row
                fill = 0
            fill = (fill + x.size) % seq_len
        blocks.append((x, t, loss))
    if not any(b is not None for b in blocks):
        raise ValueError("pack_documents: `token_arrays` holds no tokens (nothing to pack)")
    inputs, targets, losses, starts = [], [], [], []
    position = 0
    for block in blocks:
        if block is None:
            gap = -position % seq_len
            block = (np.full(gap, pad_id, np.int32), np.full(gap, pad_id, np.int32), np.zeros(gap, bool))
        x, t, loss = block
        start = np.zeros(x.size, bool)
        start[:1] = True
        inputs.append(x), targets.append(t), losses.append(loss), starts.append(start)
        position += x.size
    n_rows = -(-position // seq_len)
    size = n_rows * seq_len
    input_ids = np.full(size, pad_id, np.int32)
    target_ids = np.full(size, pad_id, np.int32)
    loss_mask = np.zeros(size, bool)
    boundaries = np.zeros(size, bool)    # a document (or a padding run) starts here
    input_ids[:position] = np.concatenate(inputs)
    target_ids[:position] = np.concatenate(targets)
    loss_mask[:position] = np.concatenate(losses)
    boundaries[:position] = np.concatenate(starts)
    if position < size:
        boundaries[position] = True
    boundaries = boundaries.reshape(n_rows, seq_len)
    boundaries[:, 0] = False  # numbering restarts at 0 in every row
    seq_idx = np.cumsum(boundaries, axis=1, dtype=np.int32)
    return {"input_ids": input_ids.reshape(n_rows, seq_len), "targets": target_ids.reshape(n_rows, seq_len),
            "loss_mask": loss_mask.reshape(n_rows, seq_len), "seq_idx": seq_idx}


def _check_rows(owner: str, rows: Rows) -> int:
    """Validate a rows dict (from `pack_documents`); returns the number of rows."""
    if not isinstance(rows, dict) or any(k not in rows for k in ROW_KEYS):
        raise ValueError(f"{owner}: `rows` must be a dict with keys {ROW_KEYS} (from pack_documents)")
    shape = np.shape(rows["input_ids"])
    if len(shape) != 2 or shape[0] < 1 or any(np.shape(rows[k]) != shape for k in ROW_KEYS):
        raise ValueError(f"{owner}: `rows` arrays must share one (rows >= 1, seq_len) shape; got "
                         f"{ {k: np.shape(rows[k]) for k in ROW_KEYS} }")
    return shape[0]


def _compact(rows: Rows, vocab_size: int) -> Rows:
    """The rows in the smallest dtypes that hold them (for memory and the disk cache)."""
    token_dtype = np.uint16 if vocab_size <= 2 ** 16 else np.int32
    idx_dtype = np.uint16 if rows["seq_idx"].max() < 2 ** 16 else np.int32
    return {"input_ids": rows["input_ids"].astype(token_dtype), "targets": rows["targets"].astype(token_dtype),
            "loss_mask": rows["loss_mask"].astype(bool), "seq_idx": rows["seq_idx"].astype(idx_dtype)}


# -------------------------------------------------------------------------------------- 4. grain pipeline
class _RowSource:
    """A grain random-access source: index -> one packed row, as int32/bool arrays of shape (seq_len,)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows["input_ids"].shape[0])

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        i = int(index)
        return {"input_ids": np.asarray(self.rows["input_ids"][i], np.int32),
                "targets": np.asarray(self.rows["targets"][i], np.int32),
                "loss_mask": np.asarray(self.rows["loss_mask"][i], bool),
                "seq_idx": np.asarray(self.rows["seq_idx"][i], np.int32)}


def shard_rows(num_rows: int, shard_index: int, shard_count: int) -> slice:
    """The slice of an epoch's (shuffled) row order that process `shard_index` of `shard_count` reads.

    Shards are interleaved (``shard_index::shard_count``): disjoint, together exactly the epoch; their
    sizes differ by at most one row.
    """
    _positive_int("shard_rows", "shard_count", shard_count)
    _non_negative_int("shard_rows", "shard_index", shard_index)
    if shard_index >= shard_count:
        raise ValueError(f"shard_rows: `shard_index` must be in [0, shard_count={shard_count}); got {shard_index}")
    if num_rows < shard_count:
        raise ValueError(f"shard_rows: {num_rows} rows cannot feed `shard_count`={shard_count} processes "
                         f"(every process needs at least one row per epoch)")
    return slice(shard_index, None, shard_count)


def text_dataset(rows: Rows, *, seed: int, batch_size: int, shard_index: int = 0, shard_count: int = 1,
                 shuffle: bool = True, num_epochs: Optional[int] = None,
                 drop_remainder: bool = True) -> grain.MapDataset:
    """The batches one process reads, as an indexable `grain.MapDataset` (``dataset[step]`` = batch).

    source(rows) → shuffle(seed) (a new permutation every epoch, from seed + epoch) → this process's
    shard of each epoch (`shard_rows`) → repeat `num_epochs` times (None: forever) → batch. Batches may
    straddle an epoch boundary. Every process must use the same `seed`. Elements are dicts of
    ``input_ids``/``targets``/``seq_idx`` int32 and ``loss_mask`` bool, each (batch_size, seq_len).

    Resuming: the dataset is a pure function of (rows, seed, shards), so ``dataset[step]`` is exact
    with no state; `text_iterator` gives a grain iterator with `get_state()`/`set_state()`.
    """
    n = _check_rows("text_dataset", rows)
    _non_negative_int("text_dataset", "seed", seed)
    if seed >= 2 ** 32:
        raise ValueError(f"text_dataset: `seed` must be < 2**32; got {seed}")
    _positive_int("text_dataset", "batch_size", batch_size)
    if num_epochs is not None:
        _positive_int("text_dataset", "num_epochs", num_epochs)
    if not isinstance(shuffle, bool):
        raise ValueError(f"text_dataset: `shuffle` must be a bool; got {shuffle!r}")
    shard = shard_rows(n, shard_index, shard_count)
    ds = grain.MapDataset.source(_RowSource(rows))
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds[shard].repeat(num_epochs)
    if num_epochs is not None and drop_remainder and len(ds) < batch_size:
        raise ValueError(f"text_dataset: `batch_size`={batch_size} exceeds the {len(ds)} rows this shard reads "
                         f"in {num_epochs} epoch(s); lower batch_size or pass num_epochs=None")
    return ds.batch(int(batch_size), drop_remainder=drop_remainder)


def text_iterator(dataset: grain.MapDataset, state: Optional[dict] = None):
    """A checkpointable iterator over `dataset` (from `text_dataset`), optionally restored to `state`.

    `it.get_state()` is a small JSON-able dict; a new iterator with `set_state(state)` (or this
    function's `state`) yields exactly the batches the saved one would have yielded next. It also goes
    into an orbax checkpoint through `grain.checkpoint.CheckpointSave/Restore`.
    """
    it = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    if state is not None:
        it.set_state(state)
    return it


# ---------------------------------------------------------------------------- 5. corpus cache and bundle
def _corpus_key(root: str, paths: Sequence[str], pattern: str, tokenizer, seq_len: int, add_bos: bool,
                split: str, eval_fraction: float) -> str:
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    blob = json.dumps({"v": 1, "root": root, "pattern": pattern, "files": stats, "tokenizer": tokenizer.fingerprint,
                       "seq_len": int(seq_len), "add_bos": bool(add_bos), "split": split,
                       "eval_fraction": float(eval_fraction)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def default_cache_dir() -> str:
    """$MAMBA_JAX_CACHE, else ~/.cache/mamba_jax/text."""
    return os.environ.get("MAMBA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mamba_jax", "text"))


def packed_text_rows(root: Optional[str] = None, pattern: str = "*.py", *, seq_len: int, tokenizer=None,
                     max_files: Optional[int] = None, add_bos: bool = True, split: str = "all",
                     eval_fraction: float = 0.05, cache_dir: Optional[str] = None,
                     use_cache: bool = True) -> Rows:
    """The packed rows of a text corpus: `text_files` → `read_documents` → encode → `pack_documents`.

    Memoised on disk as ``<cache_dir>/text_rows-<key>.npz``; the key hashes the root, pattern, every
    file's relative path, size and mtime, the tokenizer's fingerprint, seq_len, add_bos and the split,
    so a changed corpus or tokenizer is never served stale rows. Rows are held in compact dtypes
    (uint16 tokens when the vocabulary allows); `text_dataset` turns them into int32 per batch.

    Args:
      root, pattern, max_files: the corpus (see `text_files`; default: the standard library's *.py).
      seq_len: row length. tokenizer: default `ByteTokenizer()`. add_bos: start documents with BOS.
      split: "all", or "train"/"eval" — documents assigned by a stable hash of their path
        (`split_of`), `eval_fraction` of them to "eval".
      cache_dir: default `default_cache_dir()`; use_cache=False always recomputes and writes nothing.
    """
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    _positive_int("packed_text_rows", "seq_len", seq_len)
    if split not in SPLITS:
        raise ValueError(f"packed_text_rows: `split` must be one of {SPLITS}; got {split!r}")
    if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"packed_text_rows: `eval_fraction` must be in (0, 1); got {eval_fraction!r}")
    root = os.path.abspath(default_text_root() if root is None else root)
    paths = text_files(root, pattern, max_files)
    if split != "all":
        paths = [p for p in paths if split_of(os.path.relpath(p, root), eval_fraction) == split]
        if not paths:
            raise ValueError(f"packed_text_rows: no document falls in `split`={split!r} with "
                             f"`eval_fraction`={eval_fraction} (too few files)")
    cache_file = None
    if use_cache:
        cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        key = _corpus_key(root, paths, pattern, tokenizer, seq_len, add_bos, split, eval_fraction)
        cache_file = os.path.join(cache_dir, f"text_rows-{key}.npz")
        if os.path.isfile(cache_file):
            with np.load(cache_file) as data:
                return {k: data[k] for k in ROW_KEYS}
    tokens = encode_documents(tokenizer, read_documents(paths))
    rows = _compact(pack_documents(tokens, seq_len, tokenizer.eos_id, tokenizer.pad_id,
                                   bos_id=tokenizer.bos_id if add_bos else None), tokenizer.vocab_size)
    if cache_file is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **rows)
        os.replace(tmp, cache_file)
    return rows


class TextLMData:
    """Packed text rows + tokenizer + the grain pipeline of one process, for a training run.

    ``data.batch(step)`` is the batch of training step `step` (random access: resuming needs only the
    step); ``data.iterator(state)`` is the equivalent checkpointable grain iterator. Batches: dicts of
    ``input_ids``, ``targets``, ``seq_idx`` int32 and ``loss_mask`` bool numpy arrays, each
    (batch_size, seq_len). Build from files with `TextLMData.from_files(...)`.
    """

    def __init__(self, rows: Rows, tokenizer=None, *, seed: int, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1, shuffle: bool = True, num_epochs: Optional[int] = None):
        _check_rows("TextLMData", rows)
        self.rows = rows
        self.tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        for key in ("input_ids", "targets"):    # every id, padding included: the rows feed the model as they are
            check_token_ids("TextLMData", f"rows[{key!r}]", np.asarray(rows[key]), self.tokenizer.vocab_size)
        self.batch_size = batch_size
        self.dataset = text_dataset(rows, seed=seed, batch_size=batch_size, shard_index=shard_index,
                                    shard_count=shard_count, shuffle=shuffle, num_epochs=num_epochs)
        self._rows_per_epoch = len(range(*shard_rows(self.num_rows, shard_index, shard_count).indices(self.num_rows)))

    @classmethod
    def from_files(cls, root: Optional[str] = None, pattern: str = "*.py", *, seq_len: int, batch_size: int,
                   seed: int = 0, tokenizer=None, max_files: Optional[int] = None, add_bos: bool = True,
                   split: str = "all", eval_fraction: float = 0.05, cache_dir: Optional[str] = None,
                   use_cache: bool = True, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                   num_epochs: Optional[int] = None) -> "TextLMData":
        """`packed_text_rows(...)` of a corpus (cached), then the pipeline (see `text_dataset`)."""
        tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        rows = packed_text_rows(root, pattern, seq_len=seq_len, tokenizer=tokenizer, max_files=max_files,
                                add_bos=add_bos, split=split, eval_fraction=eval_fraction, cache_dir=cache_dir,
                                use_cache=use_cache)
        return cls(rows, tokenizer, seed=seed, batch_size=batch_size, shard_index=shard_index,
                   shard_count=shard_count, shuffle=shuffle, num_epochs=num_epochs)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return int(self.rows["input_ids"].shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.rows["input_ids"].shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) target tokens in all rows (every process together)."""
        return int(np.count_nonzero(self.rows["loss_mask"]))

    @property
    def steps_per_epoch(self) -> float:
        """Batches this process reads per epoch of its shard (fractional: batches straddle epochs)."""
        return self._rows_per_epoch / self.batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        """The batch of training step `step` (deterministic)."""
        if not _is_int(step) or not 0 <= step < len(self.dataset):
            raise ValueError(f"TextLMData.batch: `step` must be an int in [0, {len(self.dataset)}); got {step!r}")
        return self.dataset[int(step)]

    def iterator(self, state: Optional[dict] = None):
        """A checkpointable grain iterator over the batches (see `text_iterator`)."""
        return text_iterator(self.dataset, state)

    def __iter__(self):
        return self.iterator()
