"""Real-text LM data: tokenizers, packing (checked by an independent unpacker), the grain pipeline
(determinism, sharding, exact resume), the on-disk cache, BPE, errors, and packed rows through MambaLM."""
import json
import os

import numpy as np
import pytest

from mamba_jax.data import text as T
from mamba_jax.data.text import (ByteTokenizer, TextLMData, default_text_root, pack_documents, packed_text_rows,
                                 read_documents, text_dataset, text_files, text_iterator)

BYTE = ByteTokenizer()
UNICODE_TEXTS = ["", "hello", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀 and\ttabs\r\nCRLF", "\x00\x7f\u00ff\uffff",
                 "Ω≈ç√∫˜µ≤≥÷ — «»", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral plane"]


# ------------------------------------------------------------------------------------------- helpers
def random_docs(rng, n, max_len):
    """n random byte documents (values 0..255, so never a special id), some empty, some long."""
    lengths = rng.integers(0, max_len, size=n)
    lengths[rng.integers(0, n)] = 0
    return [rng.integers(0, 256, size=k).astype(np.int32) for k in lengths]


def unpack(rows, eos_id):
    """Independent unpacker: split each row where seq_idx changes, drop loss-masked-out (pad) segments,
    and join consecutive segments until one ends with the EOS target (a document split across rows).
    Returns a list of (inputs, targets) per document."""
    docs, cur_in, cur_tg = [], [], []
    for r in range(rows["input_ids"].shape[0]):
        s = rows["seq_idx"][r]
        cuts = [0] + [t for t in range(1, len(s)) if s[t] != s[t - 1]] + [len(s)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            m = rows["loss_mask"][r, a:b]
            assert m.all() or not m.any(), "a segment mixes real and padding positions"
            if not m.any():
                continue
            cur_in.extend(rows["input_ids"][r, a:b].tolist())
            cur_tg.extend(rows["targets"][r, a:b].tolist())
            if cur_tg[-1] == eos_id:
                docs.append((cur_in, cur_tg))
                cur_in, cur_tg = [], []
    assert not cur_in, "a document was left without its EOS target"
    return docs


def index_rows(n, seq_len=4):
    """Rows whose every token is the row's own index (to identify rows after shuffling)."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return {"input_ids": ids, "targets": ids.copy(), "loss_mask": np.ones_like(ids, bool),
            "seq_idx": np.zeros_like(ids)}


def row_ids(batches):
    return [int(r) for b in batches for r in b["input_ids"][:, 0]]


@pytest.fixture
def corpus(tmp_path):
    """A small folder of text files: nested, non-matching and excluded ones, invalid utf-8."""
    root = tmp_path / "corpus"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "site-packages").mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "class", "return", "import", "lambda", "日本", "🙂", "ü", "\n", "    ", "x", "=", "(", ")"]
    for i in range(12):
        folder = root if i < 4 else root / "pkg" if i < 8 else root / "pkg" / "sub"
        text = " ".join(rng.choice(words, size=int(rng.integers(5, 120))))
        (folder / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    (root / "notes.txt").write_text("not python", encoding="utf-8")
    (root / "site-packages" / "third_party.py").write_text("excluded", encoding="utf-8")
    (root / "pkg" / "bad.py").write_bytes(b"ok \xff\xfe bytes")
    return root


# ------------------------------------------------------------------------------------ document source
def test_text_files_sorted_filtered_and_limited(corpus):
    paths = text_files(str(corpus))
    rel = [os.path.relpath(p, corpus) for p in paths]
    expected = sorted([f"m{i:02d}.py" for i in range(4)] + [os.path.join("pkg", f"m{i:02d}.py") for i in range(4, 8)]
                      + [os.path.join("pkg", "sub", f"m{i:02d}.py") for i in range(8, 12)]
                      + [os.path.join("pkg", "bad.py")])
    assert rel == expected
    assert all(os.path.isabs(p) for p in paths)
    assert text_files(str(corpus), max_files=3) == paths[:3]
    assert [os.path.basename(p) for p in text_files(str(corpus), "*.txt")] == ["notes.txt"]


def test_read_documents_utf8_with_replacement(corpus):
    paths = text_files(str(corpus))
    docs = read_documents(paths)
    assert len(docs) == len(paths)
    bad = docs[[os.path.basename(p) for p in paths].index("bad.py")]
    assert bad == "ok \ufffd\ufffd bytes"
    with open(paths[0], encoding="utf-8") as f:
        assert docs[0] == f.read()


def test_default_root_is_the_standard_library():
    root = default_text_root()
    assert os.path.isfile(os.path.join(root, "os.py"))
    paths = text_files(max_files=5)
    assert len(paths) == 5 and all(p.startswith(os.path.abspath(root)) for p in paths)
    assert all("site-packages" not in p for p in text_files(pattern="__init__.py"))


# -------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_byte_tokenizer_round_trip(text):
    ids = BYTE.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))  # independent: the utf-8 bytes themselves
    assert BYTE.decode(ids) == text


def test_byte_tokenizer_specials():
    assert BYTE.vocab_size == 259
    specials = {BYTE.bos_id, BYTE.eos_id, BYTE.pad_id}
    assert len(specials) == 3 and all(256 <= s < BYTE.vocab_size for s in specials)
    ids = np.concatenate([[BYTE.bos_id], BYTE.encode("añb"), [BYTE.eos_id, BYTE.pad_id]])
    assert BYTE.decode(ids) == "añb"


# ---------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("seed,seq_len,use_bos", [(0, 16, True), (1, 16, False), (2, 7, True), (3, 64, False),
                                                  (4, 1, True)])
def test_packing_reconstructs_every_document(seed, seq_len, use_bos):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, 30, 3 * seq_len + 5)
    bos = BYTE.bos_id if use_bos else None
    rows = pack_documents(docs, seq_len, BYTE.eos_id, BYTE.pad_id, bos_id=bos)
    assert set(rows) == {"input_ids", "targets", "loss_mask", "seq_idx"}
    assert all(v.shape == rows["input_ids"].shape and v.shape[1] == seq_len for v in rows.values())
    assert rows["input_ids"].dtype == rows["targets"].dtype == rows["seq_idx"].dtype == np.int32
    assert rows["loss_mask"].dtype == bool
    # every document (those with at least one input token), in order, framed as documented
    kept = [d for d in docs if use_bos or len(d)]
    got = unpack(rows, BYTE.eos_id)
    assert len(got) == len(kept)
    for d, (inputs, targets) in zip(kept, got):
        full = ([BYTE.bos_id] if use_bos else []) + d.tolist() + [BYTE.eos_id]
        assert inputs == full[:-1]      # the document's inputs
        assert targets == full[1:]      # next tokens, ending with EOS, never from another document
    # no row is wasted: only the last row may hold padding, and it holds less than a row
    total = sum(len(d) + (1 if use_bos else 0) for d in kept)
    assert rows["input_ids"].shape[0] == -(-total // seq_len)


def test_packing_mask_seq_idx_and_targets_in_detail():
    rng = np.random.default_rng(7)
    seq_len = 10
    docs = [rng.integers(0, 256, size=k).astype(np.int32) for k in (3, 25, 0, 4, 6)]
    rows = pack_documents(docs, seq_len, BYTE.eos_id, BYTE.pad_id, bos_id=BYTE.bos_id)
    # the flat stream, built here independently: document i occupies len(doc)+1 positions
    lengths = [len(d) + 1 for d in docs]
    total = sum(lengths)
    doc_starts = set(np.cumsum([0] + lengths[:-1]).tolist())
    flat_mask = rows["loss_mask"].reshape(-1)
    flat_in, flat_tg = rows["input_ids"].reshape(-1), rows["targets"].reshape(-1)
    # loss_mask is zero exactly at the padding
    assert flat_mask.tolist() == [True] * total + [False] * (flat_mask.size - total)
    assert np.all(flat_in[total:] == BYTE.pad_id) and np.all(flat_tg[total:] == BYTE.pad_id)
    # seq_idx: 0 at each row start; changes exactly at document starts and where padding begins
    s = rows["seq_idx"]
    assert np.all(s[:, 0] == 0)
    for p in range(1, s.size):
        if p % seq_len == 0:
            continue
        r, c = divmod(p, seq_len)
        changed = s[r, c] != s[r, c - 1]
        assert changed == (p in doc_starts or p == total), p
        assert s[r, c] - s[r, c - 1] in (0, 1)
    # targets are the next input inside a document, EOS at a document's last position
    for p in range(total):
        if p + 1 in doc_starts or p + 1 == total:
            assert flat_tg[p] == BYTE.eos_id
        else:
            assert flat_tg[p] == flat_in[p + 1]
    # the 25-token document is longer than a row: it spans three rows, one of them entirely its own
    assert any(np.all(s[r] == 0) and np.all(rows["loss_mask"][r]) for r in range(s.shape[0]))
    assert rows["input_ids"].shape[0] == 5  # 4 + 26 + 1 + 5 + 7 = 43 tokens -> 5 rows of 10


def test_packing_padding_has_its_own_seq_idx():
    rows = pack_documents([np.arange(5, dtype=np.int32)], 8, BYTE.eos_id, BYTE.pad_id)
    assert rows["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert rows["loss_mask"].tolist() == [[True] * 5 + [False] * 3]
    assert rows["targets"].tolist() == [[1, 2, 3, 4, BYTE.eos_id] + [BYTE.pad_id] * 3]


# -------------------------------------------------------------------------------------------- pipeline
def collect(ds, n):
    return [ds[i] for i in range(n)]


def test_dataset_batches_shapes_and_determinism():
    rng = np.random.default_rng(0)
    rows = pack_documents(random_docs(rng, 40, 50), 12, BYTE.eos_id, BYTE.pad_id, bos_id=BYTE.bos_id)
    a = collect(text_dataset(rows, seed=3, batch_size=4), 6)
    b = collect(text_dataset(rows, seed=3, batch_size=4), 6)
    c = collect(text_dataset(rows, seed=4, batch_size=4), 6)
    for x in a:
        assert {k: (v.shape, v.dtype) for k, v in x.items()} == {
            "input_ids": ((4, 12), np.int32), "targets": ((4, 12), np.int32),
            "loss_mask": ((4, 12), bool), "seq_idx": ((4, 12), np.int32)}
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    # every batch row is one of the packed rows, unchanged
    packed = {r.tobytes() for r in rows["input_ids"]}
    assert all(r.astype(np.int32).tobytes() in packed for x in a for r in x["input_ids"])


def test_each_epoch_is_a_new_permutation_of_the_rows():
    n = 12
    ds = text_dataset(index_rows(n), seed=0, batch_size=3)
    ids = row_ids(collect(ds, 3 * n // 3))  # three epochs
    epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))
    assert row_ids(collect(text_dataset(index_rows(n), seed=0, batch_size=3, shuffle=False), 4)) == list(range(n))


@pytest.mark.parametrize("n,shard_count", [(11, 2), (12, 2), (10, 3)])
def test_shards_are_disjoint_and_cover_each_epoch(n, shard_count):
    rows = index_rows(n)
    for epoch in range(2):
        seen = []
        for shard in range(shard_count):
            ds = text_dataset(rows, seed=5, batch_size=1, shard_index=shard, shard_count=shard_count)
            per_epoch = len(range(shard, n, shard_count))
            seen.append(row_ids(collect(ds, (epoch + 1) * per_epoch))[epoch * per_epoch:])
        flat = [r for s in seen for r in s]
        assert sorted(flat) == list(range(n)), (epoch, seen)  # disjoint and complete
    # the shards follow the same epoch permutation: interleaving them gives the unsharded order
    full = row_ids(collect(text_dataset(rows, seed=5, batch_size=1), n))
    for shard in range(shard_count):
        ds = text_dataset(rows, seed=5, batch_size=1, shard_index=shard, shard_count=shard_count)
        assert row_ids(collect(ds, len(range(shard, n, shard_count)))) == full[shard::shard_count]


def test_finite_epochs():
    ds = text_dataset(index_rows(10), seed=1, batch_size=4, num_epochs=2)
    assert len(ds) == 5
    assert sorted(row_ids(collect(ds, 5))) == sorted(list(range(10)) * 2)


@pytest.mark.parametrize("k,n", [(0, 4), (3, 5), (7, 9)])
def test_iterator_state_resumes_exactly(k, n):
    rng = np.random.default_rng(1)
    rows = pack_documents(random_docs(rng, 30, 40), 8, BYTE.eos_id, BYTE.pad_id, bos_id=BYTE.bos_id)
    ds = text_dataset(rows, seed=11, batch_size=3)
    it = text_iterator(ds)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives serialisation
    expected = [next(it) for _ in range(n)]
    resumed = text_iterator(text_dataset(rows, seed=11, batch_size=3))
    resumed.set_state(state)
    also = text_iterator(text_dataset(rows, seed=11, batch_size=3), state)
    for want, got1, got2 in zip(expected, [next(resumed) for _ in range(n)], [next(also) for _ in range(n)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got1[key])
            np.testing.assert_array_equal(want[key], got2[key])
    # the iterator yields the random-access batches, in step order
    for step, want in enumerate(expected, start=k):
        np.testing.assert_array_equal(ds[step]["input_ids"], want["input_ids"])


# ------------------------------------------------------------------------------------- cache and bundle
def test_packed_text_rows_cache(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    rows = packed_text_rows(str(corpus), seq_len=16, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 1 and files[0].endswith(".npz")
    # the rows are those of packing the documents directly (int values; compact dtype on disk)
    docs = read_documents(text_files(str(corpus)))
    direct = pack_documents([BYTE.encode(d) for d in docs], 16, BYTE.eos_id, BYTE.pad_id, bos_id=BYTE.bos_id)
    for k in direct:
        np.testing.assert_array_equal(rows[k].astype(direct[k].dtype), direct[k])

    def fail(_paths):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(T, "read_documents", fail)
    again = packed_text_rows(str(corpus), seq_len=16, cache_dir=str(cache))
    for k in rows:
        np.testing.assert_array_equal(rows[k], again[k])
    monkeypatch.undo()
    # another seq_len, another corpus content, or no BOS: new cache entries, never stale rows
    packed_text_rows(str(corpus), seq_len=8, cache_dir=str(cache))
    packed_text_rows(str(corpus), seq_len=16, cache_dir=str(cache), add_bos=False)
    (corpus / "m00.py").write_text("changed content, different size", encoding="utf-8")
    changed = packed_text_rows(str(corpus), seq_len=16, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 4
    assert not np.array_equal(changed["input_ids"][0][:20], rows["input_ids"][0][:20])

    class ReversedBytes(ByteTokenizer):  # another tokenizer: same vocabulary, other ids for a text
        fingerprint = "reversed-bytes"

        def encode(self, text):
            return super().encode(text)[::-1].copy()

    other = packed_text_rows(str(corpus), seq_len=16, cache_dir=str(cache), tokenizer=ReversedBytes())
    assert len(os.listdir(cache)) == 5
    reversed_first = BYTE.encode(corpus.joinpath("m00.py").read_text(encoding="utf-8"))[::-1]
    np.testing.assert_array_equal(other["input_ids"][0, 1:5], reversed_first[:4])
    assert not np.array_equal(changed["input_ids"][0][:20], rows["input_ids"][0][:20])


def test_text_lm_data_from_files(corpus, tmp_path):
    data = TextLMData.from_files(str(corpus), seq_len=16, batch_size=4, seed=0, cache_dir=str(tmp_path / "c"))
    assert data.vocab_size == 259 and data.seq_len == 16
    b = data.batch(3)
    assert {k: v.shape for k, v in b.items()} == {k: (4, 16) for k in ("input_ids", "targets", "loss_mask",
                                                                      "seq_idx")}
    assert b["input_ids"].max() < data.vocab_size
    it = data.iterator()
    for step in range(5):
        x = next(it)
        np.testing.assert_array_equal(x["targets"], data.batch(step)["targets"])
    total_chars = sum(len(d.encode("utf-8")) for d in read_documents(text_files(str(corpus))))
    n_docs = len(text_files(str(corpus)))
    assert data.num_tokens == total_chars + n_docs  # bytes + one EOS target per document
    # train / eval splits are disjoint sets of documents that together make the corpus
    kw = dict(seq_len=16, use_cache=False)
    n_train = np.count_nonzero(packed_text_rows(str(corpus), split="train", eval_fraction=0.3, **kw)["input_ids"]
                               == BYTE.bos_id)
    n_eval = np.count_nonzero(packed_text_rows(str(corpus), split="eval", eval_fraction=0.3, **kw)["input_ids"]
                              == BYTE.bos_id)
    assert n_train + n_eval == n_docs and n_train > 0 and n_eval > 0


# ------------------------------------------------------------------------------------------------- BPE
def test_bpe_trains_round_trips_and_reloads(corpus, tmp_path):
    pytest.importorskip("tokenizers", reason="BPE needs the optional dependency `tokenizers`")
    docs = read_documents(text_files(str(corpus)))
    tok = T.train_bpe_tokenizer(docs, 320, path=str(tmp_path))
    assert 259 <= tok.vocab_size <= 320
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    for text in docs + UNICODE_TEXTS + ["text that spells <|eos|> and <|bos|>"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and (ids.size == 0 or ids.max() < tok.vocab_size)
        assert tok.eos_id not in ids.tolist() and tok.bos_id not in ids.tolist()
        assert tok.decode(ids) == text
    # it compresses the text it was trained on
    assert sum(len(tok.encode(d)) for d in docs) < 0.8 * sum(len(d.encode("utf-8")) for d in docs)
    loaded = T.BPETokenizer.load(str(tmp_path / "tokenizer.json"))
    assert loaded.fingerprint == tok.fingerprint
    for text in docs[:3]:
        assert loaded.encode(text).tolist() == tok.encode(text).tolist()
    rows = packed_text_rows(str(corpus), seq_len=16, tokenizer=tok, use_cache=False)
    got = unpack({k: v.astype(np.int32) if k != "loss_mask" else v for k, v in rows.items()}, tok.eos_id)
    assert [tok.decode(inp) for inp, _ in got] == docs


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,match", [
    (lambda: pack_documents([np.arange(3)], 0, 257, 258), "`seq_len` must be a positive int"),
    (lambda: pack_documents([np.arange(3)], 4, -1, 258), "`eos_id` must be a non-negative int"),
    (lambda: pack_documents([np.arange(3)], 4, 257, 258, bos_id=1.5), "`bos_id` must be a non-negative int"),
    (lambda: pack_documents([np.zeros((2, 2), np.int32)], 4, 257, 258), r"`token_arrays\[0\]` must be a 1-D int"),
    (lambda: pack_documents([np.array([0.5])], 4, 257, 258), r"`token_arrays\[0\]` must be a 1-D int"),
    (lambda: pack_documents([], 4, 257, 258), "holds no tokens"),
    (lambda: pack_documents(np.arange(3), 4, 257, 258), "`token_arrays` must be a sequence"),
    (lambda: text_dataset(index_rows(4), seed=-1, batch_size=2), "`seed` must be a non-negative int"),
    (lambda: text_dataset(index_rows(4), seed=0, batch_size=0), "`batch_size` must be a positive int"),
    (lambda: text_dataset(index_rows(4), seed=0, batch_size=1, shard_index=2, shard_count=2),
     r"`shard_index` must be in \[0, shard_count=2\)"),
    (lambda: text_dataset(index_rows(2), seed=0, batch_size=1, shard_count=3), "cannot feed `shard_count`=3"),
    (lambda: text_dataset(index_rows(4), seed=0, batch_size=5, num_epochs=1), "`batch_size`=5 exceeds"),
    (lambda: text_dataset({"input_ids": np.zeros((2, 3))}, seed=0, batch_size=1), "`rows` must be a dict with keys"),
    (lambda: text_files("/no/such/folder"), "`root` must be an existing folder"),
    (lambda: text_files(default_text_root(), "*.nothing-matches"), "no file under `root`"),
    (lambda: text_files(max_files=0), "`max_files` must be a positive int"),
    (lambda: read_documents("a_path.py"), "`paths` must be a sequence"),
    (lambda: BYTE.encode(b"bytes"), "`text` must be a str"),
    (lambda: BYTE.decode([300]), r"`ids` must lie in \[0, 259\)"),
    (lambda: packed_text_rows(seq_len=8, split="valid"), "`split` must be one of"),
    (lambda: packed_text_rows(seq_len=8, eval_fraction=1.5), "`eval_fraction` must be in"),
    (lambda: TextLMData(index_rows(4), seed=0, batch_size=2).batch(-1), "`step` must be an int"),
    (lambda: TextLMData(index_rows(300), seed=0, batch_size=2),
     r"TextLMData: `rows\['input_ids'\]` holds the id 259 at position \(\d+, \d+\), outside the vocabulary \[0, vocab_size=259\)"),
    (lambda: pack_documents([np.array([1, 2]), np.array([3, -4, 5])], 4, 0, 1),
     r"pack_documents: `token_arrays\[1\]` holds the id -4 at position 1"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bpe_bad_arguments():
    pytest.importorskip("tokenizers", reason="BPE needs the optional dependency `tokenizers`")
    with pytest.raises(ValueError, match="`vocab_size` must be an int >= 259"):
        T.train_bpe_tokenizer(["abc"], 100)
    with pytest.raises(ValueError, match="`documents` must be a non-empty sequence of str"):
        T.train_bpe_tokenizer("abc", 300)


# ------------------------------------------------------------------------------------- with the model
def test_packed_rows_through_mamba_equal_separate_documents():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mamba_jax.models import MambaConfig, MambaLM

    texts = ["def f(x):\n    return x", "héllo wörld 🙂", "a", "class A:\n    pass\n" * 2]
    docs = [BYTE.encode(t) for t in texts]
    seq_len = 24
    rows = pack_documents(docs, seq_len, BYTE.eos_id, BYTE.pad_id, bos_id=BYTE.bos_id)
    # walk the rows independently: the segments of a row where seq_idx is constant, padding excluded
    segments = []  # (row, columns)
    for r in range(rows["input_ids"].shape[0]):
        s = rows["seq_idx"][r]
        for v in np.unique(s):
            cols = np.flatnonzero(s == v)
            if rows["loss_mask"][r, cols].any():
                segments.append((r, cols))
    assert len(segments) >= len(docs)  # every document (one split across rows counts twice)
    assert any(cols[0] > 0 for _, cols in segments)  # some document starts mid-row

    model = MambaLM(MambaConfig(vocab_size=BYTE.vocab_size, d_model=32, n_layer=2, d_state=8))
    # random parameters of the right shapes (compiling `model.init` would cost more than the check)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)
    # each document alone: its own batch row from position 0, right-padded (a causal model's outputs at
    # the document's positions cannot depend on what follows them)
    alone = np.full((len(segments), seq_len), BYTE.pad_id, np.int32)
    for i, (r, cols) in enumerate(segments):
        alone[i, :len(cols)] = rows["input_ids"][r, cols]

    @jax.jit
    def run(params, input_ids, seq_idx, alone):
        packed = model.apply({"params": params}, input_ids, seq_idx=seq_idx)
        mixed = model.apply({"params": params}, input_ids)  # no seq_idx: documents see each other
        return packed, mixed, model.apply({"params": params}, alone)

    packed, mixed, alone_logits = map(np.asarray, run(params, jnp.asarray(rows["input_ids"]),
                                                      jnp.asarray(rows["seq_idx"]), jnp.asarray(alone)))
    assert np.isfinite(packed).all()
    for i, (r, cols) in enumerate(segments):
        np.testing.assert_allclose(packed[r, cols], alone_logits[i, :len(cols)], atol=1e-5, rtol=1e-5)
    # the first document, encoded on its own from its text, is the start of the first row
    first_doc = np.concatenate([[BYTE.bos_id], docs[0]])
    np.testing.assert_array_equal(alone[0, :len(first_doc)], first_doc)
    # without seq_idx the packed row differs (so the check above is not vacuous)
    r, cols = next((r, c) for r, c in segments if c[0] > 0)
    assert np.abs(mixed[r, cols] - packed[r, cols]).max() > 1e-3
