"""The loop's records, checkpoint/restore, and exact resumption (stop at k, resume to N == straight to N)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.data import MQARTask, get_batch, make_dataset
from mamba_jax.models import MambaConfig, MambaLM, init_params
from mamba_jax.train import (
    Checkpointer,
    LoopConfig,
    MetricsWriter,
    OptimizerConfig,
    create_train_state,
    evaluate,
    make_eval_step,
    make_optimizer,
    make_train_step,
    read_jsonl,
    train_loop,
)

NUM_STEPS = 8
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def setup():
    task = MQARTask(seq_len=16, num_kv_pairs=2, vocab_size=16)
    model = MambaLM(MambaConfig(vocab_size=task.vocab_size, d_model=16, n_layer=1, d_state=4))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=NUM_STEPS))
    params = init_params(model, jax.random.PRNGKey(1))
    data = make_dataset(task, seed=0, batch_size=4, num_batches=NUM_STEPS)
    eval_batches = list(make_dataset(task, seed=0, batch_size=4, num_batches=1, split="eval"))
    eval_step = make_eval_step(model.apply)
    return dict(
        # a copy each time: the train step donates (deletes) the buffers of the state it is given
        fresh_state=lambda: create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), tx),
        train_step=make_train_step(),  # one jitted function shared by every run below
        get_batch=lambda i: get_batch(data, i),
        evaluate_fn=lambda s: evaluate(eval_step, s.params, eval_batches),
    )


def _run(setup, tmp_path, *, stop_after=None, resume=False):
    config = LoopConfig(num_steps=NUM_STEPS, log_every=2, eval_every=4, checkpoint_every=2,
                        stop_after=stop_after, tokens_per_step=64, progress=False)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3, async_save=True)
    state, keep = setup["fresh_state"](), None
    if resume:
        state, meta = checkpointer.restore(state)
        keep = meta["step"]
    metrics = MetricsWriter(str(tmp_path / "metrics.jsonl"), keep_until_step=keep)
    state, history = train_loop(state, setup["train_step"], setup["get_batch"], config,
                                evaluate_fn=setup["evaluate_fn"], metrics=metrics, checkpointer=checkpointer,
                                checkpoint_meta=lambda step: {"step": step, "note": "test"})
    checkpointer.close()
    return state, history


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_records_and_checkpoints_of_a_straight_run(setup, tmp_path):
    state, history = _run(setup, tmp_path)
    assert int(state.step) == NUM_STEPS
    kinds = [(r["kind"], r["step"]) for r in history]
    assert kinds == [("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("train", 8), ("eval", 8)]
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == history
    train = [r for r in history if r["kind"] == "train"]
    assert {"loss", "accuracy", "exact_match", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in history if r["kind"] == "eval")
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        assert ckpt.all_steps() == (4, 6, 8)     # max_to_keep=3
        restored, meta = ckpt.restore(setup["fresh_state"]())
    assert meta == {"step": 8, "note": "test"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, state.params)


def test_stop_then_resume_equals_a_straight_run(setup, tmp_path):
    straight, straight_history = _run(setup, tmp_path / "straight")
    stopped, _ = _run(setup, tmp_path / "split", stop_after=4)
    assert int(stopped.step) == 4
    # an interrupted run may have logged past its last checkpoint: those records must go on resume
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 5, "loss": -1.0}) + "\n")
    resumed, _ = _run(setup, tmp_path / "split", resume=True)
    assert int(resumed.step) == NUM_STEPS
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.tree_util.tree_map(same, resumed.params, straight.params)
    jax.tree_util.tree_map(same, resumed.opt_state, straight.opt_state)
    assert _strip_timing(read_jsonl(str(tmp_path / "split" / "metrics.jsonl"))) == _strip_timing(straight_history)


def test_restore_without_checkpoint_and_bad_loop_config(tmp_path):
    with Checkpointer(str(tmp_path / "empty")) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(ValueError, match="no checkpoint"):
            ckpt.restore({"x": np.zeros(2)})
    with pytest.raises(ValueError, match="checkpoint_every"):
        LoopConfig(num_steps=10, log_every=4, checkpoint_every=6)
    with pytest.raises(ValueError, match="stop_after"):
        LoopConfig(num_steps=10, log_every=2, checkpoint_every=2, stop_after=3)
    with pytest.raises(ValueError, match="num_steps"):
        LoopConfig(num_steps=0)
    with pytest.raises(ValueError, match="step"):
        MetricsWriter(str(tmp_path / "m.jsonl")).write({"loss": 1.0})


def _numbered_rows(n_rows=40, seq_len=4):
    ids = np.arange(n_rows * seq_len, dtype=np.int32).reshape(n_rows, seq_len)
    return {"input_ids": ids, "targets": ids + 1, "loss_mask": np.ones_like(ids, bool),
            "seq_idx": np.zeros_like(ids)}


def test_grain_iterator_state_is_checkpointed_and_restored(tmp_path):
    from mamba_jax.data.text import text_dataset, text_iterator

    dataset = text_dataset(_numbered_rows(), seed=3, batch_size=4)
    expected = [dataset[i]["input_ids"] for i in range(8)]       # batch i of the (shuffled) dataset
    it = text_iterator(dataset)
    for _ in range(3):
        next(it)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(3, {"w": jnp.ones(2)}, {"step": 3}, data_iterator=it)
        ckpt.save(4, {"w": jnp.ones(2)}, {"step": 4})                       # no iterator in this one
        ckpt.wait()
        assert ckpt.has_data_iterator(3) and not ckpt.has_data_iterator(4)
        fresh = text_iterator(dataset)                                       # at batch 0
        state, meta = ckpt.restore({"w": np.zeros(2)}, step=3, data_iterator=fresh)
        assert meta == {"step": 3} and np.array_equal(state["w"], np.ones(2))
        for i in range(3, 8):
            assert np.array_equal(next(fresh)["input_ids"], expected[i])
        with pytest.raises(ValueError, match="no data-iterator state"):
            ckpt.restore({"w": np.zeros(2)}, step=4, data_iterator=text_iterator(dataset))


def test_loop_with_a_data_iterator_saves_it_and_resumes_exactly(setup, tmp_path):
    from mamba_jax.data.text import text_dataset, text_iterator

    # the MQAR batches of `setup`, served by a grain iterator instead of get_batch(step)
    batches = [setup["get_batch"](i) for i in range(NUM_STEPS)]
    assert set(batches[0]) == {"inputs", "targets", "loss_mask"}
    rows = {"input_ids": np.concatenate([b["inputs"] for b in batches]),
            "targets": np.concatenate([b["targets"] for b in batches]),
            "loss_mask": np.concatenate([b["loss_mask"] for b in batches])}
    rows["seq_idx"] = np.zeros_like(rows["input_ids"])
    dataset = text_dataset(rows, seed=0, batch_size=4, shuffle=False).map(
        lambda b: {"inputs": b["input_ids"], "targets": b["targets"], "loss_mask": b["loss_mask"]})
    config = LoopConfig(num_steps=NUM_STEPS, log_every=2, checkpoint_every=2, tokens_per_step=64, progress=False)

    def run(path, stop_after=None, resume=False):
        ckpt = Checkpointer(str(path), max_to_keep=3)
        state, it = setup["fresh_state"](), text_iterator(dataset)
        if resume:
            state, _ = ckpt.restore(state, data_iterator=it)
        state, history = train_loop(state, setup["train_step"], None,
                                    dataclasses.replace(config, stop_after=stop_after), data_iterator=it,
                                    checkpointer=ckpt)
        ckpt.close()
        return state, [r["loss"] for r in history]

    by_step = train_loop(setup["fresh_state"](), setup["train_step"], setup["get_batch"], config)[1]
    straight, losses = run(tmp_path / "straight")
    assert losses == [r["loss"] for r in by_step]               # iterator batches == step-indexed batches
    _, first = run(tmp_path / "split", stop_after=4)
    resumed, rest = run(tmp_path / "split", resume=True)
    assert first + rest == losses
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), resumed.params, straight.params)
    with pytest.raises(ValueError, match="exactly one of `get_batch`"):
        train_loop(setup["fresh_state"](), setup["train_step"], setup["get_batch"], config,
                   data_iterator=text_iterator(dataset))


@pytest.mark.parametrize("tokens_per_step", [0, 64])
def test_progress_bar_shows_a_token_rate_only_when_tokens_per_step_is_known(setup, capsys, tokens_per_step):
    config = LoopConfig(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4, tokens_per_step=tokens_per_step,
                        progress=True)
    _, history = train_loop(setup["fresh_state"](), setup["train_step"], setup["get_batch"], config)
    bar = capsys.readouterr().err
    assert "loss=" in bar and ("tok_s=" in bar) == bool(tokens_per_step)
    assert all((r["tokens_per_s"] > 0) == bool(tokens_per_step) for r in history if r["kind"] == "train")
