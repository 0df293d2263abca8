"""Metrics sinks: metrics.jsonl (one JSON object per line, each with a `step`, the number of optimizer steps
done) and, optionally, TensorBoard event files (tensorboardX), plus a reader for those event files."""
from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

# Record fields that are not scalars to plot.
NON_SCALAR_FIELDS = ("kind", "step")


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """All records of a JSON-lines file ([] when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_jsonl_tolerant(path: str) -> List[Dict[str, Any]]:
    """Like `read_jsonl`, but a torn last line (a process killed mid-write) is dropped, not an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def scalar_tag(kind: str, name: str) -> str:
    """The TensorBoard tag of metric `name` in a record of `kind`: ``train/loss``, ``eval/accuracy``
    (an ``eval_`` prefix is dropped: the group already says it)."""
    prefix = f"{kind}_"
    return f"{kind}/{name[len(prefix):] if name.startswith(prefix) else name}"


class TensorBoardWriter:
    """Writes every numeric field of a record as a scalar ``<kind>/<name>`` at the record's `step`
    (a tensorboardX `SummaryWriter` on `logdir`).

    `purge_step` (resuming at restored step k: pass k + 1) writes a session-start marker that makes
    TensorBoard (and `read_tensorboard_scalars`) drop the events of steps >= purge_step written earlier,
    e.g. by an interrupted run after its last checkpoint.
    """

    def __init__(self, logdir: str, *, purge_step: Optional[int] = None, flush_secs: int = 30):
        from tensorboardX import SummaryWriter

        self.logdir = logdir
        # tensorboardX names files by the second: a unique suffix keeps a writer opened in the same second
        # (a quick resume) from overwriting the previous file
        self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=flush_secs,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def write(self, record: Mapping[str, Any]) -> None:
        kind, step = record.get("kind", "train"), int(record["step"])
        for name, value in record.items():
            if name not in NON_SCALAR_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(scalar_tag(kind, name), float(value), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends records to a metrics.jsonl file (and to TensorBoard event files in `tensorboard_dir`).

    With `keep_until_step` (resuming from a checkpoint at that step) the records of later steps — written
    after that checkpoint by the interrupted run — are dropped first (as is a torn last line, from a run
    killed mid-write), so the file of a resumed run equals that of an uninterrupted one. Without it the
    file is started afresh. The TensorBoard writer gets ``purge_step = (keep_until_step or 0) + 1`` for the
    same effect on events left in `tensorboard_dir` by an earlier process.
    """

    def __init__(self, path: str, *, keep_until_step: Optional[int] = None, tensorboard_dir: Optional[str] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = [] if keep_until_step is None else [
            r for r in _read_jsonl_tolerant(path) if r["step"] <= keep_until_step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.tensorboard = None
        if tensorboard_dir is not None:
            self.tensorboard = TensorBoardWriter(tensorboard_dir, purge_step=(keep_until_step or 0) + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        if "step" not in record:
            raise ValueError(f"MetricsWriter.write: `record` needs a 'step'; got keys {sorted(record)}")
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tfrecords(path: str):
    """The payloads of a TFRecord file (length, masked CRC, data, masked CRC); stops at a torn or corrupt
    record (the tail of a file whose writer was killed)."""
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        end = pos + 12 + length + 4
        if length_crc != masked_crc32c(header) or end > len(data):
            return
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
            return
        yield payload
        pos = end


def read_tensorboard_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the event files in `logdir`, oldest file first.

    Honours purge markers as TensorBoard does: a session-start event at step s (`TensorBoardWriter`'s
    `purge_step`) drops the values of steps >= s read before it.
    """
    from tensorboardX.proto import event_pb2

    scalars: Dict[str, List[Tuple[int, float]]] = {}
    files = []
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        events = [event_pb2.Event.FromString(payload) for payload in _tfrecords(path)]
        if events:
            files.append((events[0].wall_time, path, events))
    for _, _, events in sorted(files, key=lambda f: f[:2]):     # oldest first (by the first event's time)
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                scalars = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in scalars.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars
