"""`mamba-jax run lm --preset smoke` end to end: files written, results.json values, resume, config errors."""
import json

import pytest

from experiments.lm import run
from experiments.lm.config import LMConfig, apply_overrides, parse_overrides, preset_config
from mamba_jax import cli
from mamba_jax.train import read_jsonl

SMOKE = preset_config("smoke", "selective_copy")
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert cli.main(["run", "lm", "--task", "selective_copy", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_every_output(smoke_run):
    out = smoke_run
    assert json.loads((out / "config.json").read_text()) == SMOKE.to_dict()
    records = read_jsonl(str(out / "metrics.jsonl"))
    # one train record every log_every steps, one eval record every eval_every steps
    expected = SMOKE.num_steps // SMOKE.log_every + SMOKE.num_steps // SMOKE.eval_every
    assert len(records) == expected == 6
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]
    png = (out / "training.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20]
    results = json.loads((out / "results.json").read_text())
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert results["steps"] == 20 and results["task"] == "selective_copy" and results["preset"] == "smoke"
    assert results["final"] == {k: v for k, v in final_eval.items() if k.startswith("eval_")}
    assert results["final"]["eval_tokens"] == SMOKE.eval_batches * SMOKE.batch_size * SMOKE.n_tokens_to_copy
    assert 0.0 <= results["final"]["eval_accuracy"] <= 1.0
    assert results["chance_accuracy"] == pytest.approx(1 / SMOKE.n_data_tokens)
    assert results["paper"]["accuracy"] == pytest.approx(0.998)
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]                     # it learns something even in 20 steps
    table = (out / "results.md").read_text()
    assert f"{100 * results['final']['eval_accuracy']:.1f}%" in table and "99.8%" in table
    assert "2312.00752" in table


def test_stop_and_resume_through_main_equals_the_straight_run(smoke_run, tmp_path):
    out = tmp_path / "split"
    assert run.main(["--task", "selective_copy", "--preset", "smoke", "--out", str(out), "--stop-after", "10"]) == 0
    assert not (out / "results.json").exists()
    assert run.main(["--resume", "--out", str(out)]) == 0
    straight = json.loads((smoke_run / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["final"] == straight["final"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rs]
    assert strip(read_jsonl(str(out / "metrics.jsonl"))) == strip(read_jsonl(str(smoke_run / "metrics.jsonl")))


@pytest.mark.parametrize("argv,message", [
    (["num_step=3"], "unknown config key `num_step`; did you mean num_steps"),
    (["d_model=big"], "config key `d_model` expects type int; got 'big'"),
    (["d_model"], "config override must look like key=value; got 'd_model'"),
    (["--stop-after", "7"], "`stop_after` must be a multiple of `log_every`"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_command_line_is_a_clear_usage_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--preset", "smoke", "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()          # nothing written before the config is valid


def test_overrides_are_typed_and_validated():
    config = apply_overrides(SMOKE, parse_overrides(["num_steps=40", "--config.learning_rate=1e-2",
                                                     "progress=true", "task=mqar"]))
    assert (config.num_steps, config.learning_rate, config.progress, config.task) == (40, 0.01, True, "mqar")
    with pytest.raises(ValueError, match="n_tokens_to_copy"):
        apply_overrides(SMOKE, {"n_tokens_to_copy": "9"})
    with pytest.raises(ValueError, match="checkpoint_every"):
        apply_overrides(SMOKE, {"checkpoint_every": "7"})
    with pytest.raises(ValueError, match="task"):
        LMConfig(task="copy")


def test_presets_build_and_refuse_a_reused_out_dir(smoke_run):
    for preset in ("smoke", "cpu", "paper"):
        for task in ("selective_copy", "mqar"):
            config = preset_config(preset, task)
            assert config.make_task().vocab_size == config.model_config().vocab_size
        assert preset_config(preset, "text").model_config().vocab_size == 259    # byte tokenizer
    assert preset_config("paper", "selective_copy").seq_len - 16 == 4096
    with pytest.raises(SystemExit):
        run.main(["--preset", "smoke", "--out", str(smoke_run)])  # holds checkpoints: needs --resume
