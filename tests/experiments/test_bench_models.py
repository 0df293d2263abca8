"""Smoke tests of `mamba-jax bench decode` / `bench prefill` at tiny sizes: they run, write their JSON,
and the cache sizes follow from the configs (flat for recurrent models, linear in context for KV caches).
No timing is asserted (timing claims live in experiments/bench_models/README.md)."""
from __future__ import annotations

import json

import pytest

from mamba_jax.cli import main as cli_main

TINY = ["--d-model", "32", "--n-layer", "2", "--pattern", "M2 A", "--n-heads", "2", "--head-dim", "16",
        "--mamba2-d-state", "8", "--vocab-size", "40", "--repeats", "1", "--batch", "2"]


def test_bench_decode_tiny(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert cli_main(["bench", "decode", *TINY, "--lengths", "16,48", "--steps", "3", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"mamba", "mamba2", "transformer", "hybrid"}
    for by_len in results.values():
        assert all(r["ms_per_token"] > 0 for r in by_len.values())
    b, layers, d_inner = 2, 2, 64
    mamba = results["mamba"]
    # Mamba-1 state per layer: conv (k-1 = 3, d_inner) + ssm (d_inner, d_state = 16), float32; + positions (b,) int32
    expected = layers * b * (3 * d_inner + d_inner * 16) * 4 + b * 4
    assert mamba["16"]["cache_bytes"] == mamba["48"]["cache_bytes"] == expected
    grow = results["transformer"]["48"]["cache_bytes"] - results["transformer"]["16"]["cache_bytes"]
    kv_bytes_per_slot = layers * b * 2 * 2 * 16 * 4  # layers · b · (k, v) · kv heads · head_dim · float32
    assert grow >= 32 * kv_bytes_per_slot and grow % 32 == 0
    printed = capsys.readouterr().out
    assert "| model | context | ms / token | speed-up vs transformer | cache MB |" in printed


def test_bench_decode_one_allocation_for_every_context(tmp_path, capsys):
    """--max-len: the KV cache has the same slots at every context (only the filled length changes)."""
    out = tmp_path / "decode.json"
    assert cli_main(["bench", "decode", *TINY, "--models", "transformer", "--lengths", "16,48", "--steps", "3",
                     "--max-len", "64", "--out", str(out)]) == 0
    by_len = json.loads(out.read_text())["results"]["transformer"]
    assert by_len["16"]["cache_bytes"] == by_len["48"]["cache_bytes"] >= 64 * 2 * 2 * 2 * 2 * 16 * 4   # slots·layers·b·(k, v)·kv·dh·4
    assert "KV cache slots 64" in capsys.readouterr().out


def test_bench_prefill_tiny(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    assert cli_main(["bench", "prefill", *TINY, "--lengths", "24", "--chunk", "10", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert all(results[m]["24"]["tokens_per_s"] > 0 for m in results)
    assert "| model | length | tokens / s | ratio vs transformer |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,pattern", [
    (["--lengths", "0"], "--lengths"),
    (["--models", "gpt"], "--models"),
    (["--pattern", "MMM"], "--pattern"),
    (["--steps", "0"], "--steps"),
    (["--lengths", "16", "--steps", "3", "--max-len", "18"], "--max-len"),
])
def test_bench_decode_rejects_bad_options(argv, pattern, capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "decode", *TINY, *argv])
    assert pattern in capsys.readouterr().err


GENERATE_TINY = ["--d-model", "32", "--n-layer", "2", "--n-heads", "4", "--n-kv-heads", "2", "--d-state", "4",
                 "--head-dim", "16", "--mamba2-d-state", "8", "--vocab-size", "40", "--repeats", "1",
                 "--prompt-len", "5"]


def test_bench_generate_equal_params_and_skipped_cells(tmp_path, capsys):
    """The four models have non-embedding parameters within 10 % of the Transformer's (depth is chosen
    for it), every row generates `length` tokens, an over-budget cell is reported as skipped, and the
    KV cache per sequence is exactly prompt + length slots."""
    out = tmp_path / "gen"
    assert cli_main(["bench", "generate", *GENERATE_TINY, "--batches", "1,2", "--lengths", "8", "--max-tokens", "8",
                     "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    base = results["transformer"]["non_embedding_params"]
    for name, r in results.items():
        assert abs(r["non_embedding_params"] - base) <= 0.1 * base, name
        assert r["cells"]["1x8"]["tokens_per_s"] > 0 and "skipped" in r["cells"]["2x8"]
    assert results["transformer"]["cells"]["1x8"]["ratio_vs_transformer"] == 1.0
    assert results["hybrid"]["layer_kinds"] == "MA"   # M1's attention placement for 2 layers: the last
    # 2 layers · (k, v) · 13 slots · 2 kv heads · head_dim 8 · 4 bytes (+ valid, segment, index, positions)
    assert results["transformer"]["cells"]["1x8"]["cache_bytes_per_seq"] >= 2 * 2 * 13 * 2 * 8 * 4
    assert (out / "ratio_vs_transformer.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| batch | generated | model | tokens / s | ratio vs transformer |" in printed
    assert "skipped (batch x length > --max-tokens 8): 2x8" in printed


def test_bench_generate_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "generate", *GENERATE_TINY, "--d-state", "3"])   # must divide head_dim 8
    assert "d_state" in capsys.readouterr().err


def test_bench_speculative_tiny(tmp_path, capsys):
    """Trains a tiny target and draft for a few steps, and the speculative tokens equal plain generate's."""
    out = tmp_path / "spec"
    assert cli_main(["bench", "speculative", "--target-d-model", "32", "--target-n-layer", "2", "--drafts", "mamba",
                     "--draft-d-model", "16", "--draft-n-layer", "1", "--train-steps", "5", "--batch-size", "2",
                     "--seq-len", "16", "--max-files", "5", "--batch", "2", "--prompt-len", "6", "--new-tokens", "9",
                     "--num-draft", "3", "--repeats", "1", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    d = results["modes"]["T=0"]["drafts"]["mamba"]
    assert d["same_tokens"] and 1 <= d["tau"] <= 4 and 3 <= d["target_calls"] <= 9
    sampled = results["modes"]["T=1"]["drafts"]["mamba"]
    assert sampled["same_tokens"] is None and 0 <= sampled["acceptance_rate"] <= 1
    assert "| draft | draft params |" in capsys.readouterr().out


def test_time_speculative_shares_kv_for_the_named_drafts_only(monkeypatch):
    """Every call of a draft — the compiling one whose stats are reported and the timed ones — shares the KV
    cache exactly when the draft is named in `share_kv`. (A lambda reading the loop variable late ran every
    compiling call with the last draft's setting, and timed a recompilation.)"""
    import jax.numpy as jnp

    import mamba_jax.inference as inference
    from experiments.bench_models.speculative import time_speculative
    from mamba_jax.inference.speculative import SpeculativeStats

    calls = []
    tokens = jnp.zeros((1, 4), jnp.int32)

    def fake_speculative(target, target_params, draft, draft_params, prompt, new_tokens, *, share_kv, **kw):
        calls.append((draft, share_kv))
        return tokens, SpeculativeStats(acceptance_rate=0.5, mean_accepted_length=2.0, target_calls=2, draft_calls=8)

    monkeypatch.setattr(inference, "speculative_generate", fake_speculative)
    monkeypatch.setattr(inference, "generate", lambda *a, **k: tokens)
    drafts = {"shared": ("draft A", None), "own": ("draft B", None), "shared too": ("draft C", None)}
    time_speculative("target", None, drafts, jnp.zeros((1, 2), jnp.int32), 4, num_draft=3, temperature=0.0, seed=0,
                     repeats=2, share_kv=("shared", "shared too"))
    assert sorted(calls) == sorted([("draft A", True), ("draft B", False), ("draft C", True)] * 3)
