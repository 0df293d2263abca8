"""`mamba-jax run icl --preset smoke` end to end: it writes every output and the numbers in them hold."""
import json

import numpy as np
import pytest

from experiments.icl.config import ICLConfig, preset_config
from mamba_jax.cli import main as cli_main


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["run", "icl", "--preset", "smoke", "--out", str(out), "models=mamba,transformer,hybrid",
                     "hybrid_pattern=M A"]) == 0
    for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "errors.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    config = ICLConfig(**results["config"])
    errors = {k: np.asarray(v) for k, v in results["errors"].items()}
    assert set(errors) == {"mamba", "transformer", "hybrid", "least_squares", "averaging", "3-nn"}
    assert all(e.shape == (config.eval_points,) and np.isfinite(e).all() for e in errors.values())
    # closed forms on noiseless linear regression: least squares is exact once it has d examples;
    # averaging's error at i examples is (d + 1) / i in expectation
    assert errors["least_squares"][config.d:].max() < 1e-6
    assert errors["least_squares"][:config.d].min() > 1e-3
    expected_avg = np.array([(config.d + 1) / i for i in range(1, config.eval_points)])
    assert np.abs(errors["averaging"][1:] - expected_avg).mean() < 0.5 * expected_avg.mean()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"mamba", "transformer", "hybrid"}
    assert records[-1]["step"] == config.num_steps and records[-1]["points"] == config.points_end
    assert "| model / baseline |" in capsys.readouterr().out


@pytest.mark.parametrize("override,pattern", [
    (dict(models="mamba,gpt"), "`models`"),
    (dict(eval_points=3), "`eval_points`"),
    (dict(task="nope"), "`task`"),
    (dict(d=0), "`d`"),
])
def test_bad_config_is_named(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        ICLConfig(**{**vars(preset_config("smoke")), **override})


def test_bad_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "icl", "--preset", "smoke", "num_stepz=3"])
    assert "num_steps" in capsys.readouterr().err
