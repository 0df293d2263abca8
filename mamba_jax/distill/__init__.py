"""Distillation: pure-function KD losses (`losses`), attention → Mamba-2 / Mamba-1 initialisation and progressive
replacement (`attention_init`) and the teacher–student train step (`train`)."""
from mamba_jax.distill.attention_init import (
    attention_to_mamba1,
    attention_to_mamba2,
    extend_student,
    mamba1_group_order,
    mamba1_mixer_from_attention,
    mamba1_student_config,
    mamba2_mixer_from_attention,
    mamba2_student_config,
    new_mixer_mask,
    replaced_layers,
)
from mamba_jax.distill.losses import (
    KL_KINDS,
    forward_kl,
    forward_kl_topk,
    hidden_cosine,
    hidden_mse,
    jsd,
    kd_loss,
    kl_from_log_probs,
    masked_mean,
    reverse_kl,
)
from mamba_jax.distill.train import (
    STAGE1_KD,
    STAGE2_KD,
    KDConfig,
    freeze_except,
    kd_batch_loss,
    make_kd_eval_step,
    make_kd_train_step,
    start_stage2,
    teacher_logits,
)

__all__ = ["KL_KINDS", "KDConfig", "STAGE1_KD", "STAGE2_KD", "attention_to_mamba1", "attention_to_mamba2",
           "extend_student", "forward_kl", "forward_kl_topk",
           "freeze_except", "hidden_cosine", "hidden_mse", "jsd", "kd_batch_loss", "kd_loss", "kl_from_log_probs",
           "make_kd_eval_step", "make_kd_train_step", "mamba1_group_order", "mamba1_mixer_from_attention",
           "mamba1_student_config", "mamba2_mixer_from_attention", "mamba2_student_config",
           "masked_mean", "new_mixer_mask", "replaced_layers", "reverse_kl", "start_stage2", "teacher_logits"]
