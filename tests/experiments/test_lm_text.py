"""`mamba-jax run lm --task text --preset smoke` end to end: real text (the standard library's sources)
packed with seq_idx, held-out bits per byte beside the unigram baseline, exact resume, text-key errors."""
import json
import math
import os

import numpy as np
import pytest

from experiments.lm import run
from experiments.lm.config import apply_overrides, preset_config
from mamba_jax import cli
from mamba_jax.train import read_jsonl, read_tensorboard_scalars

SMOKE = preset_config("smoke", "text")
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Packed rows are cached here, not in the home folder."""
    path = str(tmp_path_factory.mktemp("text_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAMBA_JAX_CACHE", path)
        yield path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("smoke_text")
    assert cli.main(["run", "lm", "--task", "text", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_text_smoke_run_writes_every_output_and_learns(smoke_run, capsys):
    out = smoke_run
    assert json.loads((out / "config.json").read_text()) == SMOKE.to_dict()
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15, 20]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    png = (out / "training.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]

    results = json.loads((out / "results.json").read_text())
    final, base, data = results["final"], results["baseline"], results["data"]
    assert results["task"] == "text" and results["steps"] == 20
    assert final == {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    bpb = final["eval_bits_per_byte"]
    assert math.isfinite(bpb) and 0 < bpb < 8.0                      # below a uniform byte model
    # byte tokenizer: tokens = bytes + one EOS per finished document, so bits/byte ≈ loss / ln 2
    assert data["eval_bytes"] <= final["eval_tokens"] < data["eval_bytes"] + 16
    assert bpb == pytest.approx(final["eval_loss"] * final["eval_tokens"] / math.log(2) / data["eval_bytes"])
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert 3.0 < base["unigram_bits_per_byte"] < 8.0 and 3.0 < base["train_unigram_entropy_bits_per_byte"] < 8.0
    assert data["train_files"] + data["eval_files"] == SMOKE.text_max_files and data["eval_files"] >= 1
    table = (out / "results.md").read_text()
    assert f"| {bpb:.3f} |" in table and f"| {base['unigram_bits_per_byte']:.3f} |" in table
    scalars = read_tensorboard_scalars(str(out / "tensorboard"))
    assert [s for s, _ in scalars["eval/bits_per_byte"]] == [10, 20]


def test_text_stop_and_resume_equals_the_straight_run(smoke_run, tmp_path, cache_dir):
    out = tmp_path / "split"
    assert run.main(["--task", "text", "--preset", "smoke", "--out", str(out), "--stop-after", "10"]) == 0
    assert not (out / "results.json").exists()
    saved = [json.loads(p.read_text()) for p in (out / "checkpoints" / "10" / "data").glob("*.json")]
    assert len(saved) == 1 and saved[0]["next_index"] == 10      # the grain iterator's position, in the checkpoint
    assert run.main(["--resume", "--out", str(out)]) == 0
    straight = json.loads((smoke_run / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["final"] == straight["final"] and resumed["baseline"] == straight["baseline"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rs]
    assert strip(read_jsonl(str(out / "metrics.jsonl"))) == strip(read_jsonl(str(smoke_run / "metrics.jsonl")))


def test_text_data_batches_baseline_and_bpe(tmp_path, cache_dir):
    config = apply_overrides(SMOKE, {"tokenizer": "bpe", "bpe_vocab_size": "300"})
    text = run.TextData(config, str(tmp_path), resume=False)
    assert (tmp_path / "tokenizer.json").exists() and text.tokenizer.vocab_size <= config.model_config().vocab_size
    batch = text.batch(3)
    assert set(batch) == {"inputs", "targets", "loss_mask", "seq_idx"}
    assert batch["inputs"].shape == (config.batch_size, config.seq_len)
    assert all(np.array_equal(batch[k], text.batch(3)[k]) for k in batch)        # a pure function of the step
    it = text.iterator()                                    # the checkpointed iterator yields batch(i) at step i
    for i in range(4):
        got = next(it)
        assert all(np.array_equal(got[k], text.batch(i)[k]) for k in batch)
    # bytes of the evaluated targets: the decoded text's UTF-8 length
    targets = np.concatenate([b["targets"][b["loss_mask"]] for b in text.eval_batches])
    assert text.eval_bytes == len(text.tokenizer.decode(targets).encode("utf-8"))
    assert text.eval_rows == min(text.eval_rows_total, config.eval_batches * config.batch_size)
    # resuming loads the saved tokenizer rather than training another
    again = run.TextData(config, str(tmp_path), resume=True)
    assert again.tokenizer.fingerprint == text.tokenizer.fingerprint


@pytest.mark.parametrize("argv,message", [
    (["tokenizer=words"], "`tokenizer` must be one of ('byte', 'bpe')"),
    (["bpe_vocab_size=100"], "`bpe_vocab_size` must be an int >= 259"),
    (["text_max_files=-1"], "`text_max_files` must be a non-negative int"),
    (["text_eval_fraction=1.5"], "`text_eval_fraction` must be in (0, 1)"),
    (["text_root=/no/such/folder"], "`text_root` must be an existing folder"),
    (["text_patern=*.rst"], "unknown config key `text_patern`; did you mean text_pattern"),
])
def test_bad_text_keys_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--task", "text", "--preset", "smoke", "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
