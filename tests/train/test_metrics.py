"""metrics.jsonl + TensorBoard sinks: event files hold the logged scalar tags, resume drops/purges what an
interrupted run logged after its checkpoint (also a torn last jsonl line)."""
import os

import numpy as np
import pytest

from mamba_jax.train import MetricsWriter, read_jsonl, read_tensorboard_scalars
from mamba_jax.train.metrics import scalar_tag


def _train(step, loss):
    return {"kind": "train", "step": step, "loss": loss, "accuracy": 0.5, "learning_rate": 1e-3}


def test_event_files_hold_every_scalar_tag(tmp_path):
    tb = tmp_path / "tensorboard"
    with MetricsWriter(str(tmp_path / "metrics.jsonl"), tensorboard_dir=str(tb)) as writer:
        for step in (2, 4):
            writer.write(_train(step, 1.0 / step))
        writer.write({"kind": "eval", "step": 4, "eval_loss": 0.75, "eval_accuracy": 0.625, "note": "text"})
    assert [f for f in os.listdir(tb) if f.startswith("events.out.tfevents.")]
    scalars = read_tensorboard_scalars(str(tb))
    assert set(scalars) == {"train/loss", "train/accuracy", "train/learning_rate", "eval/loss", "eval/accuracy"}
    assert scalars["train/loss"] == [(2, 0.5), (4, 0.25)]
    assert scalars["eval/accuracy"] == [(4, 0.625)]
    np.testing.assert_allclose([v for _, v in scalars["train/learning_rate"]], [1e-3, 1e-3], rtol=1e-7)
    assert len(read_jsonl(str(tmp_path / "metrics.jsonl"))) == 3
    assert scalar_tag("eval", "eval_exact_match") == "eval/exact_match"
    assert scalar_tag("train", "grad_norm") == "train/grad_norm"


def test_resume_drops_later_records_purges_events_and_a_torn_line(tmp_path):
    path, tb = str(tmp_path / "metrics.jsonl"), str(tmp_path / "tensorboard")
    with MetricsWriter(path, tensorboard_dir=tb) as writer:     # the interrupted run: checkpoint at step 2
        for step in (1, 2, 3, 4):
            writer.write(_train(step, float(step)))
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')            # killed mid-write
    with MetricsWriter(path, keep_until_step=2, tensorboard_dir=tb) as writer:   # resumed from step 2
        for step in (3, 4):
            writer.write(_train(step, 10.0 * step))
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert len(os.listdir(tb)) == 2                              # the second writer did not overwrite the first
    assert read_tensorboard_scalars(tb)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    # a fresh (non-resumed) writer starts both afresh
    with MetricsWriter(path, tensorboard_dir=tb) as writer:
        writer.write(_train(1, 7.0))
    assert read_jsonl(path) == [_train(1, 7.0)]
    assert read_tensorboard_scalars(tb)["train/loss"] == [(1, 7.0)]


def test_a_torn_line_elsewhere_is_still_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError):
        MetricsWriter(str(path), keep_until_step=3)
    with pytest.raises(ValueError, match="step"):
        MetricsWriter(str(tmp_path / "m.jsonl")).write({"loss": 1.0})
