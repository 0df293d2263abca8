"""metrics.jsonl: one JSON object per line, each with a `step` (the number of optimizer steps done)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """All records of a JSON-lines file ([] when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends records to a metrics.jsonl file.

    With `keep_until_step` (resuming from a checkpoint at that step) the records of later steps — written
    after that checkpoint by the interrupted run — are dropped first, so the file of a resumed run equals
    that of an uninterrupted one. Without it the file is started afresh.
    """

    def __init__(self, path: str, *, keep_until_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = [] if keep_until_step is None else [r for r in read_jsonl(path) if r["step"] <= keep_until_step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: Mapping[str, Any]) -> None:
        if "step" not in record:
            raise ValueError(f"MetricsWriter.write: `record` needs a 'step'; got keys {sorted(record)}")
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
