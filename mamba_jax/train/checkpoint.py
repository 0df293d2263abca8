"""Checkpointing with orbax: the train state plus a JSON `meta` (step, config, ...) per saved step.

Data needs no checkpointed iterator: batches are indexed by step (`mamba_jax.data.get_batch`), so
restoring the state at step k and reading batch k onwards resumes a run exactly.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with two items per step: ``state`` and ``meta``.

    Args:
      directory: where the step folders go (created if missing; made absolute).
      max_to_keep: how many of the newest checkpoints to keep.
      async_save: save in a background thread (`wait` or `close` blocks until written).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"Checkpointer: `max_to_keep` must be a positive int; got {max_to_keep!r}")
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=("state", "meta"))

    def save(self, step: int, state, meta: Dict[str, Any]) -> None:
        """Save `state` (any pytree, e.g. a TrainState) and the JSON-serialisable `meta` as `step`."""
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> Tuple[int, ...]:
        return tuple(self._manager.all_steps())

    def restore(self, target, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
        """Restore ``(state, meta)`` at `step` (default: the latest).

        `target` is a state of the right structure (e.g. a freshly initialised TrainState); only its
        shapes and dtypes are used, and non-array fields (apply_fn, tx) are kept from it.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"Checkpointer.restore: no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise ValueError(f"Checkpointer.restore: `step` {step} not in saved steps {self.all_steps()}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
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
