"""Small helpers shared by the benchmark scripts: timing, hardware description, tables."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
