"""`mamba-jax run selective_copy`: the three arms run through `mamba-jax run lm` and the table holds their
numbers; the arms are the models they claim to be (that the LTI layer's Δ, B, C have a zero gradient with
respect to the input: tests/models/test_mamba_lti.py)."""
import json

import pytest

from experiments.selective_copy.config import ARMS, SelectiveCopyConfig, preset_config
from mamba_jax.cli import main as cli_main
from mamba_jax.layers import MambaConfig, TransformerConfig


def test_smoke_run_collects_every_arm(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["run", "selective_copy", "--preset", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "results.md").stat().st_size > 0
    assert list(results["arms"]) == ["s6", "lti", "transformer"]
    config = SelectiveCopyConfig(**results["config"])
    for arm, r in results["arms"].items():
        run = json.loads((out / arm / "results.json").read_text())
        # each arm is the paper's task: not teacher-forced, the configured noise region
        assert run["config"]["copy_teacher_forced"] is False and run["config"]["seq_len"] == config.seq_len
        assert {k: run["config"][k] for k in ARMS[arm]} == ARMS[arm]
        assert r["accuracy"] == run["final"]["eval_accuracy"] and r["num_params"] == run["num_params"]
        assert r["curve"][-1] == [config.num_steps, r["accuracy"]]
    # the LTI arm has Δ, B, C as parameters (no x_proj / dt_proj kernel); the Transformer has attention
    assert results["arms"]["lti"]["num_params"] < results["arms"]["s6"]["num_params"]
    assert results["chance_accuracy"] == pytest.approx(1 / config.n_data_tokens)
    printed = capsys.readouterr().out
    assert "Selectivity gap (S6 − LTI)" in printed and "56.4%" in printed and "99.8%" in printed
    # a second call finds every arm done: it trains nothing (the arms' files stay as they were) and writes
    # the same numbers
    stamps = {arm: (out / arm / "results.json").stat().st_mtime_ns for arm in results["arms"]}
    assert cli_main(["run", "selective_copy", "--preset", "smoke", "--out", str(out)]) == 0
    assert stamps == {arm: (out / arm / "results.json").stat().st_mtime_ns for arm in results["arms"]}
    assert json.loads((out / "results.json").read_text())["arms"] == results["arms"]


def test_arms_build_the_models_they_name():
    config = preset_config("cpu")
    assert config.noise_len >= 256 and config.seq_len == config.noise_len + config.n_tokens_to_copy
    s6, lti, transformer = (config.lm_config(arm).model_config() for arm in ("s6", "lti", "transformer"))
    assert isinstance(s6, MambaConfig) and s6.selective and isinstance(lti, MambaConfig) and not lti.selective
    assert isinstance(transformer, TransformerConfig) and transformer.position_embedding == "rope"
    assert s6.d_model == lti.d_model == transformer.d_model and s6.n_layer == transformer.n_layer
    paper = preset_config("paper")
    assert (paper.noise_len, paper.n_tokens_to_copy, paper.n_data_tokens, paper.d_model, paper.n_layer) == \
        (4096, 16, 14, 64, 2)
    assert paper.lm_config("s6").copy_teacher_forced is False


@pytest.mark.parametrize("override,pattern", [
    (dict(arms="s6,s4"), "`arms`"), (dict(noise_len=1, n_tokens_to_copy=2), "`noise_len`"), (dict(d_model=0), "`d_model`")])
def test_bad_config_is_named(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        SelectiveCopyConfig(**{**vars(preset_config("smoke")), **override})
