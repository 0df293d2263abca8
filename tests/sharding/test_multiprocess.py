"""Two jax processes (jax.distributed on CPU, gloo collectives), 2 CPU devices each, train data parallel
over the 4 global devices and must match a 1-device run of the same global batches; their checkpoint
(written by both processes) restores in both and in this single-process pytest run.

The workers are `multiprocess_worker.py` (the device count and `jax.distributed.initialize` must come
before jax is used, so they are separate interpreters)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mamba_jax.sharding import MeshConfig, distributed, make_mesh_from_config
from mamba_jax.train import sharded_training

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
_spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)   # its config, batches and `flat` (no jax set-up at import)
_spec.loader.exec_module(worker)
ROOT = os.path.dirname(os.path.dirname(HERE))
NUM_PROCESSES, TIMEOUT_S, TOL = 2, 240, 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text, n=4000):
    return text[-n:] if text else "<empty>"


def _run_workers(out_dir, meanwhile=lambda: None):
    """Start both processes, call `meanwhile()` (the reference run, overlapping the workers' compiles), wait
    (bounded); kill both when either fails or time runs out. Returns (failure or None, report, stdouts,
    meanwhile's result)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    logs = [(open(out_dir / f"out{i}.txt", "w+"), open(out_dir / f"err{i}.txt", "w+")) for i in range(NUM_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(out_dir), str(port), str(i), str(NUM_PROCESSES)],
                              stdout=o, stderr=e, env=env, cwd=ROOT) for i, (o, e) in enumerate(logs)]
    deadline, failed, result = time.time() + TIMEOUT_S, None, None
    try:
        result = meanwhile()
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                failed = f"timed out after {TIMEOUT_S}s"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                failed = "a process failed"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    outs = []
    for o, e in logs:
        o.seek(0), e.seek(0)
        outs.append((o.read(), e.read()))
        o.close(), e.close()
    codes = [p.returncode for p in procs]
    if failed is None and any(codes):
        failed = "a process failed"
    report = "\n".join(f"--- process {i} (exit {c}) stdout:\n{_tail(so)}\n--- process {i} stderr:\n{_tail(se)}"
                       for i, (c, (so, se)) in enumerate(zip(codes, outs)))
    return failed, report, [so for so, _ in outs], result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("two_processes")
    t0 = time.time()
    failed, report, stdouts, reference = _run_workers(out_dir, _reference)
    return dict(failed=failed, report=report, stdouts=stdouts, out_dir=out_dir, reference=reference,
                seconds=time.time() - t0)


def _reference():
    """The same 3 steps on one device, no sharding (losses, and the trained params + optimiser state)."""
    from mamba_jax.models import MambaLM, init_params
    from mamba_jax.train import create_train_state, make_train_step
    model = MambaLM(worker.config())
    state = create_train_state(model.apply, init_params(model, jax.random.PRNGKey(0)), worker.optimizer())
    step, losses = make_train_step(donate=False), []
    for b in worker.make_batches():
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return losses, state


def test_two_processes_train_like_one_device_and_checkpoint(two_processes):
    r = two_processes
    assert r["failed"] is None, f"{r['failed']}\n{r['report']}"
    for i, out in enumerate(r["stdouts"]):
        lines = out.strip().splitlines()
        assert lines and lines[-1] == "OK" and f"process {i}: restore OK" in out, r["report"]
    # process 0 prints the losses; both saw the same (replicated) loss after restoring
    losses = json.loads(next(ln for ln in r["stdouts"][0].splitlines() if ln.startswith("LOSSES "))[7:])
    nxt = [next(ln for ln in out.splitlines() if "NEXT" in ln).split("NEXT ")[1] for out in r["stdouts"]]
    assert nxt[0] == nxt[1], nxt

    ref_losses, ref = r["reference"]
    assert len(losses) == worker.STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=TOL)
    expected = np.load(r["out_dir"] / "expected.npz")
    got = worker.flat({"params": ref.params, "opt_state": ref.opt_state})
    assert set(got) == set(expected.files)
    for name in expected.files:
        np.testing.assert_allclose(expected[name], got[name], rtol=TOL, atol=TOL, err_msg=name)


def test_two_process_checkpoint_restores_in_one_process(two_processes):
    r = two_processes
    assert r["failed"] is None, f"{r['failed']}\n{r['report']}"
    from mamba_jax.models import MambaLM
    from mamba_jax.train import Checkpointer
    mesh = make_mesh_from_config(MeshConfig(), devices=jax.devices()[:1])
    tr = sharded_training(MambaLM(worker.config()), worker.optimizer(), mesh, "dp", seq_len=worker.SEQ)
    with Checkpointer(str(r["out_dir"] / "ckpt")) as ckpt:
        restored, meta = ckpt.restore(tr.abstract_state)
    assert meta == {"step": worker.STEPS, "processes": NUM_PROCESSES} and int(restored.step) == worker.STEPS
    expected = np.load(r["out_dir"] / "expected.npz")
    got = worker.flat({"params": restored.params, "opt_state": restored.opt_state})
    assert set(got) == set(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_single_process_helpers_and_errors():
    assert distributed.process_shard() == (0, 1)
    mesh = make_mesh_from_config(MeshConfig(), devices=jax.devices()[:1])
    from mamba_jax.sharding import batch_sharding
    sh = batch_sharding(mesh, "dp")
    local = {"inputs": np.arange(12, dtype=np.int32).reshape(4, 3)}
    g = distributed.global_batch(local, sh)
    assert g["inputs"].shape == (4, 3) and g["inputs"].sharding == sh
    np.testing.assert_array_equal(np.asarray(g["inputs"]), local["inputs"])
    assert distributed.local_batch_size(4, sh) == 4
    with pytest.raises(ValueError, match="scalar leaf"):
        distributed.global_batch({"x": np.int32(3)}, sh)
    with pytest.raises(ValueError, match="'host:port'"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="`num_processes` must be a positive int"):
        distributed.initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match=r"`process_id` must be an int in \[0, 2\); got 2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
