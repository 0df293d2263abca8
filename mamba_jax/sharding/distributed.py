"""Multi-process (multi-host) training helpers around `jax.distributed`.

One Python process per host (or, for tests, several on one machine); each sees its own local devices,
and `jax.devices()` lists the devices of *all* processes once `initialize` has run, so a mesh built by
`make_mesh_from_config(MeshConfig(data=-1))` spans every process. Every process runs the same program
(same model, same mesh, same jitted steps) on global `jax.Array`s; each process only supplies the rows
of the batch that live on its own devices:

    from mamba_jax.sharding import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=i)  # before any other jax call
    index, count = distributed.process_shard()                               # (i, 2)
    mesh = make_mesh_from_config(MeshConfig(data=-1))                        # all global devices
    tr = sharded_training(model, tx, mesh, "dp")
    state = tr.init_state(jax.random.PRNGKey(0))                             # same seed everywhere
    ds = text_dataset(rows, seed=0, batch_size=b_local, shard_index=index, shard_count=count)
    batch = distributed.global_batch(ds[step], tr.batch_sharding)            # (b_local*count, l) global
    state, metrics = tr.train_step(state, batch)                             # metrics replicated
    Checkpointer(path).save(step, state, meta)   # every process calls save/restore (orbax coordinates)

CPU: `jax.distributed` works on CPU with gloo cross-process collectives (the default CPU collectives
implementation in jax 0.10; older jax needed `jax.config.update("jax_cpu_collectives_implementation",
"gloo")`, which `initialize` sets when that option exists and is unset). `XLA_FLAGS=
--xla_force_host_platform_device_count=N` gives each process N local CPU devices.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["initialize", "is_initialized", "process_shard", "global_batch", "local_batch_size",
           "to_local_numpy"]

_INITIALIZED = False


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               local_device_ids: Optional[Any] = None, timeout_s: Optional[int] = None) -> None:
    """Join a multi-process jax run (`jax.distributed.initialize`) — call it first, before any jax computation.

    Args:
      coordinator: "host:port" of process 0's coordination service (e.g. "127.0.0.1:12345"); every
        process passes the same address; process 0 listens on it.
      num_processes: how many processes take part (>= 1).
      process_id: this process's index in [0, num_processes).
      local_device_ids: optional subset of this process's local devices to use.
      timeout_s: seconds to wait for every process to join (jax's `initialization_timeout`, default 300).
    Raises ValueError on bad arguments, RuntimeError when jax already ran a computation or device query
    in this process (the backend is then fixed to one process) or when jax raises while joining.
    Note: when the other processes never join within `timeout_s`, jax 0.10 *aborts* this process
    (SIGABRT, exit 134, "DEADLINE_EXCEEDED ... RegisterTask") instead of raising; likewise a process
    whose peer dies mid-run is terminated by the coordination service. Supervise the processes from
    outside (a launcher that kills the rest when one exits non-zero).
    """
    global _INITIALIZED
    import jax

    if not isinstance(coordinator, str) or ":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit():
        raise ValueError(f"distributed.initialize: `coordinator` must be 'host:port'; got {coordinator!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"distributed.initialize: `num_processes` must be a positive int; got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"distributed.initialize: `process_id` must be an int in [0, {num_processes}); "
                         f"got {process_id!r}")
    if _INITIALIZED or jax.distributed.is_initialized():
        raise RuntimeError("distributed.initialize: jax.distributed is already initialised in this process")
    try:   # gloo is the default on jax >= 0.5; set it explicitly only where the option exists and is unset
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    kwargs = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if timeout_s is not None:
        kwargs["initialization_timeout"] = int(timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        if "before" in msg and "backend" in msg.lower():
            raise RuntimeError("distributed.initialize must run before any jax computation or device query "
                               f"in this process (jax says: {msg})") from e
        raise RuntimeError(f"distributed.initialize: process {process_id}/{num_processes} could not join the "
                           f"coordinator at {coordinator}: {msg}") from e
    _INITIALIZED = True
    if jax.process_count() != num_processes:
        raise RuntimeError(f"distributed.initialize: asked for {num_processes} processes but jax reports "
                           f"{jax.process_count()}")


def is_initialized() -> bool:
    """Whether `jax.distributed` has been initialised in this process."""
    import jax
    return _INITIALIZED or jax.distributed.is_initialized()


def process_shard() -> Tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``: the `shard_index`/`shard_count` for `text_dataset`.

    (0, 1) in a single-process run.
    """
    import jax
    return jax.process_index(), jax.process_count()


def local_batch_size(global_batch_size: int, sharding) -> int:
    """Rows of a (global_batch_size, ...) batch that this process supplies under `sharding`.

    ValueError unless the global batch splits evenly over the batch-sharded devices (and so processes).
    """
    import jax

    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    n = len(rows)
    if n * jax.process_count() != global_batch_size and not sharding.is_fully_replicated:
        raise ValueError(f"local_batch_size: the global batch {global_batch_size} does not split evenly over "
                         f"{jax.process_count()} processes under {sharding}")
    return n


def global_batch(local_batch, sharding, global_batch_size: Optional[int] = None):
    """This process's rows → one global, batch-sharded `jax.Array` per leaf.

    Args:
      local_batch: a pytree of host arrays, each (b_local, ...) — the rows this process feeds (e.g.
        `text_dataset(..., shard_index=jax.process_index(), shard_count=jax.process_count())[step]`).
      sharding: the batch sharding (`ShardedTraining.batch_sharding`, i.e. NamedSharding(mesh,
        P(("data", "fsdp")))), over a mesh that spans every process.
      global_batch_size: default b_local · jax.process_count() (every process feeds as many rows).
    Returns the same pytree of global arrays, each (b_local · process_count, ...), sharded by
    `sharding`; process p's rows are rows [p·b_local, (p+1)·b_local) of the global batch when the mesh
    lists the processes' devices in process order (as `jax.devices()` does).
    Every process must call it (with the same shapes) in the same order.
    """
    import jax
    import numpy as np

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("global_batch: a scalar leaf has no batch dimension")
        n = x.shape[0] * jax.process_count() if global_batch_size is None else int(global_batch_size)
        return jax.make_array_from_process_local_data(sharding, x, (n,) + x.shape[1:])

    return jax.tree_util.tree_map(one, local_batch)


def to_local_numpy(tree):
    """A pytree of (possibly multi-process) jax.Arrays → numpy, for fully replicated or addressable arrays.

    Replicated arrays (metrics, dp parameters) come back whole; for arrays sharded across processes use
    `jax.experimental.multihost_utils.process_allgather` instead (a collective every process must call).
    """
    import jax
    import numpy as np

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("to_local_numpy: array is sharded across processes; use "
                                 "jax.experimental.multihost_utils.process_allgather")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)
