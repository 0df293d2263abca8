"""Data: grain pipelines and synthetic tasks."""
from mamba_jax.data.synthetic import (
    SPLITS,
    TASKS,
    MQARTask,
    SelectiveCopyTask,
    example_rng,
    get_batch,
    make_dataset,
    make_task,
)

__all__ = ["MQARTask", "SPLITS", "SelectiveCopyTask", "TASKS", "example_rng", "get_batch", "make_dataset",
           "make_task"]
