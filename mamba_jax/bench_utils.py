"""Small helpers shared by the benchmark scripts and experiments: timing, hardware description, mean ± sd
over seeds, tables."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence, Tuple

import jax
import numpy as np


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(first-call seconds incl. compilation, median seconds of `repeats` calls); blocks on results."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def hardware_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.default_backend()} ({devices}); "
            f"{datetime.date.today().isoformat()}")


def mean_and_sd(values: Sequence[Optional[float]], ddof: int = 1) -> Tuple[Optional[float], Optional[float]]:
    """(mean, standard deviation with `ddof`: 1 = sample, 0 = population) of one quantity over seeds or runs;
    (None, None) when any value is None (a missing value, e.g. a target never reached, stays visible instead
    of being averaged away); the sd of a single value is 0."""
    if not len(values) or any(v is None for v in values):
        return None, None
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=ddof)) if x.size > 1 else 0.0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
