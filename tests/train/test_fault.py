"""Fault tolerance of `mamba-jax run lm`: SIGKILL at a random step, then SIGKILL in the middle of a checkpoint
save, each followed by `--resume`, must end with the metrics (per log window, every field but timing), the
TensorBoard scalars and the final results of an uninterrupted run.

The runs are real `python -m mamba_jax.cli run lm` subprocesses. The interrupted ones go through a small
launcher (`_LAUNCHER`) that patches two things in the child only: every metrics write sleeps a little (so
the test can kill at a step of its choosing on any machine), and, on request, orbax's final rename of the
checkpoint of a given step hangs (so the kill lands while that checkpoint exists only as orbax's
`<step>.orbax-checkpoint-tmp-*` directory). Training itself is untouched.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time


from mamba_jax.train import Checkpointer, read_jsonl, read_tensorboard_scalars

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS, LOG_EVERY, CHECKPOINT_EVERY = 32, 2, 4
OVERRIDES = [f"num_steps={NUM_STEPS}", f"log_every={LOG_EVERY}", f"checkpoint_every={CHECKPOINT_EVERY}",
             "eval_every=8", "max_checkpoints_to_keep=2"]
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")
DEADLINE_S = 240  # only so that a broken run cannot hang the suite; nothing is timed

_LAUNCHER = r"""
import asyncio, os, sys, time
from mamba_jax.train import metrics
_write = metrics.MetricsWriter.write
def write(self, record):
    _write(self, record)
    time.sleep(float(os.environ["FAULT_WRITE_DELAY_S"]))
metrics.MetricsWriter.write = write
hang_step = int(os.environ.get("FAULT_HANG_SAVE_STEP", "0"))
if hang_step:
    from orbax.checkpoint._src.path import atomicity
    _finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        name = self.get_final().name
        if name.isdigit() and int(name) == hang_step:
            await asyncio.sleep(3600)
        return await _finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
from mamba_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _start(out, *extra, launcher=False, hang_save_step=0, log=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", FAULT_WRITE_DELAY_S="0.05", FAULT_HANG_SAVE_STEP=str(hang_save_step),
               # the runs compile the same programs: later ones load them from this test's own cache
               JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    head = [sys.executable, "-c", _LAUNCHER] if launcher else [sys.executable, "-m", "mamba_jax.cli"]
    cmd = head + ["run", "lm", "--task", "selective_copy", "--preset", "smoke", "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _finish(proc, log):
    assert proc.wait(timeout=DEADLINE_S) == 0, open(log).read()[-3000:]


def _train_steps(out):
    """Steps of the train records in metrics.jsonl so far (a line being written is skipped)."""
    steps = []
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("kind") == "train":
                    steps.append(record["step"])
    return steps


def _kill_when(proc, condition, log, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n" + open(log).read()[-3000:]
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _committed_steps(out):
    return sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_sigkill_at_a_random_step_and_during_a_save_then_resume_equals_a_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    logs = {name: str(tmp_path / f"{name}.log") for name in ("straight", "killed", "killed_in_save", "resumed")}
    straight_proc = _start(straight, *OVERRIDES, log=logs["straight"])     # runs beside the split run

    # 1. SIGKILL once the run has logged past a random step k
    k = random.Random().randint(1, NUM_STEPS - 3 * CHECKPOINT_EVERY)
    proc = _start(split, *OVERRIDES, launcher=True, log=logs["killed"])
    _kill_when(proc, lambda: any(s > k for s in _train_steps(split)), logs["killed"], f"a step > {k}")
    restored = max(_committed_steps(split) or [0])
    assert restored <= max(_train_steps(split)), k

    # 2. resume, and SIGKILL while the checkpoint two saves later is being written (before its commit)
    hang = restored + 2 * CHECKPOINT_EVERY
    proc = _start(split, "--resume", launcher=True, hang_save_step=hang, log=logs["killed_in_save"])
    pattern = os.path.join(split, "checkpoints", f"{hang}.orbax-checkpoint-tmp*")
    _kill_when(proc, lambda: glob.glob(pattern), logs["killed_in_save"], f"the temporary checkpoint {hang}")
    assert f"resumed {split} at step {restored}" in open(logs["killed_in_save"]).read() or restored == 0
    assert hang not in _committed_steps(split) and max(_committed_steps(split)) == hang - CHECKPOINT_EVERY
    assert max(_train_steps(split)) >= hang          # it logged past the checkpoint it was saving
    # the previous checkpoint is intact and restorable
    from experiments.lm.config import config_from_dict
    from experiments.lm.run import build_train_state
    config = config_from_dict(json.loads((split / "config.json").read_text()))
    with Checkpointer(str(split / "checkpoints")) as checkpointer:
        state, meta = checkpointer.restore(build_train_state(config)[1])
    assert meta["step"] == int(state.step) == hang - CHECKPOINT_EVERY

    # 3. resume to the end
    _finish(_start(split, "--resume", log=logs["resumed"]), logs["resumed"])
    assert f"resumed {split} at step {hang - CHECKPOINT_EVERY}" in open(logs["resumed"]).read()
    _finish(straight_proc, logs["straight"])

    ours, reference = read_jsonl(str(split / "metrics.jsonl")), read_jsonl(str(straight / "metrics.jsonl"))
    assert [r["step"] for r in reference if r["kind"] == "train"] == list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))
    assert _strip(ours) == _strip(reference), f"killed after step {k}, then during the save of step {hang}"
    assert json.loads((split / "results.json").read_text())["final"] == \
        json.loads((straight / "results.json").read_text())["final"]
    tb_ours, tb_reference = (read_tensorboard_scalars(str(d / "tensorboard")) for d in (split, straight))
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "eval/loss", "eval/accuracy"} <= set(tb_reference)
    for tag in ("train/loss", "train/accuracy", "eval/loss"):
        assert tb_ours[tag] == tb_reference[tag], tag
    assert [s for s, _ in tb_reference["train/loss"]] == list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))
