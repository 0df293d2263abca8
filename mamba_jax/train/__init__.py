"""Training: optimiser, train state, step functions, loop, checkpointing, metrics."""
from mamba_jax.train.checkpoint import Checkpointer
from mamba_jax.train.loop import LoopConfig, NonFiniteLossError, train_loop
from mamba_jax.train.metrics import MetricsWriter, TensorBoardWriter, read_jsonl, read_tensorboard_scalars
from mamba_jax.train.optim import (
    LR_SCHEDULES,
    OptimizerConfig,
    decays,
    learning_rate_schedule,
    make_optimizer,
    path_names,
    weight_decay_mask,
)
from mamba_jax.train.sharded import ShardedTraining, follow_param_shardings, sharded_training, train_state_shardings
from mamba_jax.train.step import (
    TrainState,
    accumulated_grads,
    create_train_state,
    evaluate,
    make_eval_step,
    make_train_step,
    masked_cross_entropy,
    masked_mean,
    masked_token_stats,
    split_micro_batches,
    step_rng,
)

__all__ = ["Checkpointer", "LR_SCHEDULES", "LoopConfig", "MetricsWriter", "NonFiniteLossError", "ShardedTraining",
           "follow_param_shardings", "sharded_training", "train_state_shardings", "OptimizerConfig", "TensorBoardWriter",
           "TrainState", "accumulated_grads", "create_train_state", "decays", "evaluate", "learning_rate_schedule",
           "make_eval_step", "make_optimizer", "make_train_step", "masked_cross_entropy", "masked_mean", "masked_token_stats",
           "path_names", "read_jsonl", "read_tensorboard_scalars", "split_micro_batches", "step_rng", "train_loop",
           "weight_decay_mask"]
