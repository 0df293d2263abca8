"""One process of a 2-process data-parallel run on CPU; run as a script (`test_multiprocess.py` starts two).

    python tests/sharding/multiprocess_worker.py OUT_DIR PORT PROCESS_ID NUM_PROCESSES

Each process has 2 fake CPU devices (so 4 global devices), joins the coordinator on 127.0.0.1:PORT,
trains the tiny MambaLM 3 steps data parallel over all 4 devices feeding its own half of each global
batch (`make_batches`), saves a checkpoint (every process calls `Checkpointer.save`), restores it in
every process and checks it equals the trained state. Process 0 prints `LOSSES <json>` and writes
OUT_DIR/expected.npz (the trained params and optimiser state); every process prints "OK" last.
"""
import json
import os
import sys
import time

import numpy as np

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 32, 16, 8, 3


def config():
    from mamba_jax.models import MambaConfig
    return MambaConfig(vocab_size=VOCAB, d_model=16, n_layer=1, d_state=4)


def optimizer():
    from mamba_jax.train import OptimizerConfig, make_optimizer
    return make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))


def make_batches(n=STEPS, batch=GLOBAL_BATCH, length=SEQ, seed=0):
    """The deterministic global batches: dicts of (batch, length) int32 inputs/targets, bool loss_mask."""
    rng = np.random.default_rng(seed)
    return [dict(inputs=rng.integers(0, VOCAB, (batch, length)).astype(np.int32),
                 targets=rng.integers(0, VOCAB, (batch, length)).astype(np.int32),
                 loss_mask=rng.random((batch, length)) < 0.7) for _ in range(n)]


def flat(tree):
    import jax

    from mamba_jax.sharding.distributed import to_local_numpy
    from mamba_jax.train import path_names
    return {"/".join(path_names(p)): x for p, x in jax.tree_util.tree_flatten_with_path(to_local_numpy(tree))[0]}


def main(out_dir, port, process_id, num_processes):
    t0 = time.time()
    from mamba_jax.sharding import distributed
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=120)

    import jax

    from mamba_jax.models import MambaLM
    from mamba_jax.sharding import MeshConfig, make_mesh_from_config
    from mamba_jax.train import sharded_training
    from mamba_jax.train import Checkpointer

    index, count = distributed.process_shard()
    assert (index, count) == (process_id, num_processes), (index, count)
    assert len(jax.local_devices()) == 2 and len(jax.devices()) == 2 * num_processes, jax.devices()
    mesh = make_mesh_from_config(MeshConfig(data=-1))
    assert mesh.devices.size == 2 * num_processes
    tr = sharded_training(MambaLM(config()), optimizer(), mesh, "dp", seq_len=SEQ)
    state = tr.init_state(jax.random.PRNGKey(0))

    local = GLOBAL_BATCH // count
    assert distributed.local_batch_size(GLOBAL_BATCH, tr.batch_sharding) == local
    losses = []
    for b in make_batches():
        mine = {k: v[index * local:(index + 1) * local] for k, v in b.items()}   # this process's rows only
        batch = distributed.global_batch(mine, tr.batch_sharding)
        assert batch["inputs"].shape == (GLOBAL_BATCH, SEQ) and not batch["inputs"].is_fully_addressable
        assert batch["inputs"].sharding == tr.batch_sharding
        state, metrics = tr.train_step(state, batch)
        losses.append(float(distributed.to_local_numpy(metrics["loss"])))
    print(f"process {index}: trained {STEPS} steps in {time.time() - t0:.1f}s", flush=True)
    if index == 0:
        print("LOSSES " + json.dumps(losses), flush=True)

    trained = flat({"params": state.params, "opt_state": state.opt_state})
    if index == 0:
        np.savez(os.path.join(out_dir, "expected.npz"), **trained)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    with Checkpointer(ckpt_dir) as ckpt:            # every process saves (orbax coordinates the writes)
        ckpt.save(STEPS, state, {"step": STEPS, "processes": count})
    with Checkpointer(ckpt_dir) as ckpt:            # ... and restores, onto the 4-device global mesh
        restored, meta = ckpt.restore(tr.abstract_state)
    assert meta == {"step": STEPS, "processes": count}, meta
    assert int(distributed.to_local_numpy(restored.step)) == STEPS
    leaf = restored.params["norm_f"]["weight"]
    assert leaf.sharding == tr.param_shardings["norm_f"]["weight"] and not leaf.is_fully_addressable
    got = flat({"params": restored.params, "opt_state": restored.opt_state})
    assert got.keys() == trained.keys()
    for k in trained:
        np.testing.assert_array_equal(got[k], trained[k], err_msg=f"process {index} restore: {k}")
    print(f"process {index}: restore OK", flush=True)
    # the restored state trains on (and agrees across processes: the losses are replicated)
    b = make_batches(1, seed=1)[0]
    mine = {k: v[index * local:(index + 1) * local] for k, v in b.items()}
    _, metrics = tr.train_step(restored, distributed.global_batch(mine, tr.batch_sharding))
    print(f"process {index}: NEXT {float(distributed.to_local_numpy(metrics['loss'])):.8f}", flush=True)
    print(f"process {index}: done in {time.time() - t0:.1f}s", flush=True)
    print("OK", flush=True)


if __name__ == "__main__":   # (the test imports this module for its config: set the devices only here)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
