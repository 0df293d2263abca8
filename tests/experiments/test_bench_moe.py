"""`mamba-jax bench moe` at a tiny size: the table has one dense-Mamba row and one row per MoE arm and
dispatch path, the matched configs are the moe_mamba experiment's arms, and each ratio is the row's
tokens/s over the mamba row's (printed and returned). No timing is asserted (figures live in the README)."""
from __future__ import annotations

import json

import pytest

from experiments.bench_moe import run
from experiments.moe_mamba.config import MoEMambaConfig
from mamba_jax.cli import main as cli_main

TINY = ["--d-model", "16", "--n-blocks", "1", "--n-experts", "4", "--d-state", "4", "--seq-len", "16",
        "--batch", "2", "--steps", "2"]


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_bench_moe_tiny_table(tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert cli_main(["bench", "moe", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| arm |"))
    assert _cells(lines[header]) == run.HEADER
    rows = [_cells(line) for line in lines[header + 2:] if line.startswith("|")]
    assert [(r[0], r[1]) for r in rows] == [("mamba", "—"), ("moe", "dense"), ("moe", "sorted")]
    data = json.loads(out.read_text())
    assert [(r["arm"], r["dispatch"]) for r in data["rows"]] == [("mamba", None), ("moe", "dense"), ("moe", "sorted")]
    base_tps = float(rows[0][5])
    assert rows[0][6] == "1"
    for row, rec in zip(rows, data["rows"]):
        # printed tokens/s and step ms are the returned measurements; the ratio is a ratio of tokens/s
        assert float(row[5]) == pytest.approx(rec["tokens_per_s"], rel=1e-3, abs=1)
        assert float(row[4]) == pytest.approx(rec["step_s"] * 1e3, rel=1e-2)
        assert rec["tokens_per_s"] == pytest.approx(2 * 16 / rec["step_s"], rel=1e-9)
        assert len(rec["step_times_s"]) == 2 and min(rec["step_times_s"]) <= rec["step_s"] <= max(rec["step_times_s"])
        assert rec["ratio_vs_mamba"] == pytest.approx(rec["tokens_per_s"] / data["rows"][0]["tokens_per_s"], rel=1e-9)
        assert float(row[6]) == pytest.approx(float(row[5]) / base_tps, rel=1e-2)
    # both dispatch paths time the same model: same parameter counts; MoE-Mamba and Mamba are matched in
    # active parameters per token (the experiment's arms) to within the size of one MoE layer's router
    assert rows[1][2:4] == rows[2][2:4]
    assert [int(r[3].replace(",", "")) for r in rows] == [rec["active"] for rec in data["rows"]]


def test_bench_uses_the_experiment_arms():
    config = run.experiment_config(d_model=16, n_blocks=1, n_experts=4, seq_len=16, batch=2, d_state=4)
    assert isinstance(config, MoEMambaConfig) and config.arm_names() == ("mamba", "moe")
    assert config.model_config("mamba").n_layer == 2 and config.model_config("moe").layer_kinds == ("M", "E")


def test_bench_moe_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "moe", "--help"])
    assert exit_info.value.code == 0
    assert "--dispatches" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "moe", "--dispatches", "dense,fast"])
    assert exit_info.value.code == 2 and "--dispatches" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "moe", "--arms", "mamba,moe_x"])
    assert exit_info.value.code == 2 and "unknown arm" in capsys.readouterr().err
