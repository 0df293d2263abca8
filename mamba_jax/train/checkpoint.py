"""Checkpointing with orbax: the train state plus a JSON `meta` (step, config, ...) per saved step.

Data: a grain iterator passed as `data_iterator` is saved with the state (item ``data``, through
`grain.checkpoint.CheckpointSave`, one small JSON file per process) and restored into the iterator you
pass to `restore`, so a resumed run reads exactly the batches it would have read next. Runs whose batches
are a pure function of the step (`mamba_jax.data.get_batch`) need no iterator: restoring the state at
step k and reading batch k onwards is already exact.

Sharded states: orbax writes each array's shards (from any device count) and `restore` places the
arrays on the shardings you ask for — those of the `target`'s arrays, `jax.ShapeDtypeStruct(...,
sharding=...)` leaves, or an explicit `shardings` tree — so a state saved on 8 devices restores onto 1
or 4 (`ShardedTraining.abstract_state` is such a target).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with two items per step: ``state`` and ``meta``.

    Args:
      directory: where the step folders go (created if missing; made absolute).
      max_to_keep: how many checkpoints to keep: the newest ones, or with `best_metric` the best ones.
      async_save: save in a background thread (`wait` or `close` blocks until written).
      best_metric: keep the `max_to_keep` best checkpoints by this metric (e.g. "eval_loss") instead of
        the newest. A save's metric comes from `save(..., metrics=...)` or else from its `meta` (when it
        has the key); checkpoints saved without it are deleted once newer ones exist.
      best_mode: "min" (lower is better, e.g. a loss) or "max" (e.g. an accuracy).
      keep_latest: with `best_metric`, also keep this many of the newest checkpoints (default 1), so a
        run can always resume from its last save.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True,
                 best_metric: Optional[str] = None, best_mode: str = "min", keep_latest: int = 1):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"Checkpointer: `max_to_keep` must be a positive int; got {max_to_keep!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: `best_mode` must be 'min' or 'max'; got {best_mode!r}")
        if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
            raise ValueError(f"Checkpointer: `best_metric` must be a metric name (str) or None; got {best_metric!r}")
        if not isinstance(keep_latest, int) or keep_latest < 0:
            raise ValueError(f"Checkpointer: `keep_latest` must be an int >= 0; got {keep_latest!r}")
        self.directory = os.path.abspath(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        if best_metric is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                   create=True)
        else:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies = [ocm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=max_to_keep,
                                  keep_checkpoints_without_metrics=False)]
            if keep_latest:
                policies.append(ocm.LatestN(n=keep_latest))
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=async_save,
                create=True, preservation_policy=ocm.AnyPreservationPolicy(policies))
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta", "data"))

    def save(self, step: int, state, meta: Dict[str, Any], metrics: Optional[Mapping[str, float]] = None, *,
             data_iterator=None) -> None:
        """Save `state` (any pytree, e.g. a TrainState, sharded or not) and the JSON-serialisable `meta`.

        metrics: numbers that rank checkpoints when the Checkpointer has a `best_metric` (default: taken
        from `meta` when it holds `best_metric`).
        data_iterator: a grain iterator (e.g. `TextLMData.iterator()`) whose position is saved with the
        state; its state is taken now, synchronously, even when the arrays are written asynchronously.
        """
        if self.best_metric is not None:
            if metrics is None and self.best_metric in meta:
                metrics = {self.best_metric: meta[self.best_metric]}
            if metrics is not None:
                if self.best_metric not in metrics:
                    raise ValueError(f"Checkpointer.save: `metrics` {sorted(metrics)} lack the best_metric "
                                     f"{self.best_metric!r}")
                metrics = {k: float(v) for k, v in metrics.items()}
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or None when there is none."""
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The step with the best `best_metric` (the latest step when there is no best_metric), or None."""
        return self._manager.best_step()

    def all_steps(self) -> Tuple[int, ...]:
        return tuple(self._manager.all_steps())

    def has_data_iterator(self, step: Optional[int] = None) -> bool:
        """Whether the checkpoint at `step` (default: the latest) holds a data-iterator state."""
        step = self.latest_step() if step is None else step
        return step is not None and os.path.isdir(os.path.join(self.directory, str(step), "data"))

    def restore(self, target, step: Optional[int] = None, *, shardings=None,
                data_iterator=None) -> Tuple[Any, Dict[str, Any]]:
        """Restore ``(state, meta)`` at `step` (default: the latest).

        data_iterator: a grain iterator over the same dataset as the saved one; it is set, in place, to
        the saved position (a ValueError when the checkpoint holds no iterator state).

        `target` is a state of the right structure (e.g. a freshly initialised TrainState, or one of
        `jax.ShapeDtypeStruct`s such as `ShardedTraining.abstract_state`); only its shapes and dtypes are
        used, and non-array fields (apply_fn, tx) are kept from it. Where each array goes:
          - `shardings` (a tree of `jax.sharding.Sharding`s with the target's structure, or one Sharding
            for every array) when given;
          - else the target leaf's own sharding (a jax.Array or a ShapeDtypeStruct with `sharding`);
          - else (numpy arrays, plain ShapeDtypeStructs) the default device.
        So the saved device count does not matter: a state saved on 8 devices restores onto 1 or 4.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"Checkpointer.restore: no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise ValueError(f"Checkpointer.restore: `step` {step} not in saved steps {self.all_steps()}")
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def abstract_leaf(leaf, sharding=None):
            shape, dtype = np.shape(leaf), getattr(leaf, "dtype", None) or np.asarray(leaf).dtype
            if sharding is None:
                sharding = getattr(leaf, "sharding", None) or default
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        if shardings is None:
            abstract = jax.tree_util.tree_map(abstract_leaf, target)
        elif isinstance(shardings, jax.sharding.Sharding):
            abstract = jax.tree_util.tree_map(lambda leaf: abstract_leaf(leaf, shardings), target)
        else:
            try:
                abstract = jax.tree_util.tree_map(abstract_leaf, target, shardings)
            except ValueError as e:
                raise ValueError(f"Checkpointer.restore: `shardings` must have the structure of `target` "
                                 f"(one Sharding per array): {e}") from None
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            if not self.has_data_iterator(step):
                raise ValueError(f"Checkpointer.restore: the checkpoint at step {step} in {self.directory} holds "
                                 f"no data-iterator state (it was saved without `data_iterator`)")
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        state = jax.tree_util.tree_map(jnp.asarray, restored.state)
        return state, dict(restored.meta)

    def wait(self) -> None:
        """Block until every pending (async) save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
