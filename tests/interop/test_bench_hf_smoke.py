"""Smoke test of `mamba-jax bench hf` at a tiny size: it runs, writes its JSON, and both sides agree.

No timing is asserted (timing claims live in experiments/bench_hf/README.md)."""
from __future__ import annotations

import json

import pytest

from experiments.bench_hf.run import main, parse_args


def test_bench_hf_tiny_run_writes_results(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--d-model", "32", "--n-layer", "2", "--vocab-size", "67", "--batch", "2", "--seq-len", "24",
               "--prompt-len", "5", "--decode-tokens", "6", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    r = report["results"]
    assert r["greedy_tokens_match"] is True
    for key in ("hf_forward_tok_s", "ours_forward_tok_s", "hf_decode_tok_s", "ours_decode_tok_s"):
        assert r[key] > 0, key
    assert report["config"]["d_model"] == 32 and report["versions"]["jax"]
    printed = capsys.readouterr().out
    assert "| forward tok/s (batch 2 x 24) |" in printed and "greedy tokens identical: True" in printed


@pytest.mark.parametrize("argv,pattern", [
    (["--batch", "0"], "--batch"),
    (["--batch", "3", "--host-devices", "2"], "--host-devices"),
])
def test_bench_hf_rejects_bad_options(argv, pattern, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert pattern in capsys.readouterr().err
