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
