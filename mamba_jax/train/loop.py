"""The training loop: steps, periodic logging/eval/checkpointing, a tqdm progress bar."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from mamba_jax.train.checkpoint import Checkpointer
from mamba_jax.train.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When the loop logs, evaluates and checkpoints (all in optimizer steps).

    Train metrics are averaged over each `log_every` window; checkpoints (every `checkpoint_every` steps,
    at `stop_after` and at the end) must fall on window ends so a resumed run logs the same windows.
    `stop_after` ends this process early (after a checkpoint), e.g. to split a run over jobs.
    """

    num_steps: int
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    stop_after: Optional[int] = None
    tokens_per_step: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopConfig: `{name}` must be a positive int; got {value!r}")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"LoopConfig: `checkpoint_every` ({self.checkpoint_every}) must be a multiple of "
                             f"`log_every` ({self.log_every}) so that resumed runs log the same windows")
        if self.stop_after is not None and (
                not isinstance(self.stop_after, int) or not 0 < self.stop_after <= self.num_steps
                or self.stop_after % self.log_every):
            raise ValueError(f"LoopConfig: `stop_after` must be a multiple of `log_every` ({self.log_every}) in "
                             f"(0, num_steps={self.num_steps}]; got {self.stop_after!r}")


class NonFiniteLossError(FloatingPointError):
    """A train step returned a NaN or infinite loss. `step` is the first such step (1-based, as logged);
    `last_checkpoint` the newest checkpoint step on disk (None without a checkpointer or checkpoint), which
    holds the last good state: the loop saves nothing after a non-finite loss."""

    def __init__(self, step: int, loss: float, last_checkpoint: Optional[int], directory: Optional[str] = None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        where = ("no checkpoint was saved" if last_checkpoint is None
                 else f"the last good checkpoint is step {last_checkpoint}" + (f" in {directory}" if directory else ""))
        super().__init__(f"train_loop: the loss is {loss} at step {step}; training stopped before saving anything "
                         f"after it ({where}). Lower the learning rate, clip gradients or check the data "
                         "(e.g. a target id outside the vocabulary) and resume from that checkpoint.")


def _first_non_finite(window: List[Mapping[str, Any]], first_step: int):
    """(step, loss) of the first non-finite `loss` of a window of step metrics, or None."""
    losses = np.asarray(jax.device_get([m["loss"] for m in window]), np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    return None if bad.size == 0 else (first_step + int(bad[0]), float(losses[bad[0]]))


def _is_boundary(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _mean_metrics(window: List[Mapping[str, Any]]) -> Dict[str, float]:
    """Mean over the window of each scalar metric, as Python floats (one device transfer)."""
    host = jax.device_get(window)
    return {name: float(np.mean([m[name] for m in host], dtype=np.float64)) for name in host[0]}


def train_loop(state, train_step: Callable, get_batch: Optional[Callable[[int], Any]], config: LoopConfig, *,
               data_iterator=None,
               evaluate_fn: Optional[Callable[[Any], Dict[str, float]]] = None,
               metrics: Optional[MetricsWriter] = None,
               checkpointer: Optional[Checkpointer] = None,
               checkpoint_meta: Optional[Callable[[int], Dict[str, Any]]] = None):
    """Train from ``state.step`` up to ``config.num_steps`` (or ``config.stop_after``).

    Args:
      state: a TrainState (its `step` is where training continues, e.g. after a restore).
      train_step: ``(state, batch) -> (state, metrics)``, e.g. `make_train_step()`.
      get_batch: step index -> the batch of that step (deterministic, for exact resumption); or None
        with `data_iterator`.
      data_iterator: instead of `get_batch`, a grain iterator positioned at `state.step` (e.g. restored
        by `Checkpointer.restore(..., data_iterator=it)`); the loop takes one batch per step and saves
        the iterator's state in every checkpoint.
      config: a LoopConfig.
      evaluate_fn: ``state -> dict of floats``; run every `eval_every` steps and at the end.
      metrics: a `MetricsWriter` (jsonl, optionally TensorBoard; anything with ``write(record)`` and
        ``flush()``): ``{"kind": "train", "step", <mean train metrics>, "tokens_per_s", "elapsed_s"}``
        every `log_every` steps and ``{"kind": "eval", "step", <eval metrics>}``; flushed before each
        checkpoint.
      checkpointer / checkpoint_meta: save ``state`` and ``checkpoint_meta(step)`` (default
        ``{"step": step}``) every `checkpoint_every` steps, at `stop_after` and at the end.
    Returns ``(state, history)``, history the list of records written by this call.
    Raises `NonFiniteLossError` (naming the step and the last good checkpoint) when a step's ``loss`` is
    NaN or infinite. Losses are checked once per `log_every` window, before anything of that window is
    logged or saved (checkpoints fall on window ends), so no checkpoint ever holds a state after a bad step.
    """
    if (get_batch is None) == (data_iterator is None):
        raise ValueError("train_loop: pass exactly one of `get_batch` (step -> batch) and `data_iterator`")
    if data_iterator is not None:
        get_batch = lambda _step: next(data_iterator)  # noqa: E731
    start = int(jax.device_get(state.step))
    end = config.num_steps if config.stop_after is None else config.stop_after
    history: List[Dict[str, Any]] = []

    def emit(record):
        history.append(record)
        if metrics is not None:
            metrics.write(record)

    bar = tqdm(total=config.num_steps, initial=start, disable=not config.progress, unit="step",
               dynamic_ncols=True, desc="train")
    postfix: Dict[str, str] = {}
    window: List[Mapping[str, Any]] = []
    t_start = t_window = time.perf_counter()
    for step in range(start + 1, end + 1):
        state, step_metrics = train_step(state, get_batch(step - 1))
        window.append(step_metrics)
        bar.update(1)
        if _is_boundary(step, config.log_every, end):
            if "loss" in window[0]:
                bad = _first_non_finite(window, step - len(window) + 1)
                if bad is not None:
                    bar.close()
                    if metrics is not None:
                        metrics.flush()
                    last = None
                    if checkpointer is not None:
                        checkpointer.wait()
                        last = checkpointer.latest_step()
                    raise NonFiniteLossError(*bad, last, getattr(checkpointer, "directory", None))
            record = {"kind": "train", "step": step, **_mean_metrics(window)}
            now = time.perf_counter()
            record["tokens_per_s"] = config.tokens_per_step * len(window) / max(now - t_window, 1e-9)
            record["elapsed_s"] = now - t_start
            emit(record)
            postfix.update(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            if config.tokens_per_step:   # unknown (0): no rate shown rather than "tok_s=0"
                postfix["tok_s"] = f"{record['tokens_per_s']:.0f}"
            bar.set_postfix(postfix)
            window, t_window = [], now
        t_aside = time.perf_counter()
        if evaluate_fn is not None and _is_boundary(step, config.eval_every, config.num_steps):
            record = {"kind": "eval", "step": step, **evaluate_fn(state)}
            emit(record)
            if "eval_accuracy" in record:
                postfix["eval_acc"] = f"{record['eval_accuracy']:.3f}"
                bar.set_postfix(postfix)
        if checkpointer is not None and _is_boundary(step, config.checkpoint_every, end):
            if metrics is not None:
                metrics.flush()  # buffered sinks (TensorBoard) hold every record up to a checkpoint on disk
            checkpointer.save(step, state, checkpoint_meta(step) if checkpoint_meta else {"step": step},
                              data_iterator=data_iterator)
        t_window += time.perf_counter() - t_aside  # eval/checkpoint time does not count for tokens/s
    bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    return state, history
