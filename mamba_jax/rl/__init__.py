"""Reinforcement-learning post-training of any DecoderLM: GRPO with verifiable rewards (M1's recipe)."""
from mamba_jax.rl.grpo import (
    AGGREGATIONS,
    GRPOConfig,
    completion_logprobs,
    group_advantages,
    grpo_iteration,
    grpo_loss,
    make_grpo_step,
    rollout,
)

__all__ = ["AGGREGATIONS", "GRPOConfig", "completion_logprobs", "group_advantages", "grpo_iteration", "grpo_loss",
           "make_grpo_step", "rollout"]
