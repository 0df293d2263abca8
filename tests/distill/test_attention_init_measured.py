"""The measured check of issue 9: on a Transformer trained here (MQAR, tiny), the student whose Mamba-2
mixer starts from the teacher's attention (the linear-attention defaults of `attention_to_mamba2`) starts
closer to the teacher than one with a randomly initialised mixer, and recovers the teacher faster in
stage 1 (only the new mixer trains, forward KL).

One run (seed 0) in the test; the margins come from `measure(seed)` for seeds 0-7 (numbers in the test
docstrings), each with headroom below the worst seed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.data import MQARTask, get_batch, make_dataset
from mamba_jax.distill import (
    KDConfig,
    attention_to_mamba2,
    freeze_except,
    make_kd_eval_step,
    make_kd_train_step,
    new_mixer_mask,
)
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.models import TransformerLM, init_params
from mamba_jax.models.hybrid import HybridLM
from mamba_jax.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step

TASK = MQARTask(seq_len=16, num_kv_pairs=2, vocab_size=32)
# learned absolute positions: the Mamba-2 scan has no place for rotary embeddings (module docstring)
TEACHER = TransformerConfig(vocab_size=TASK.vocab_size, d_model=64, n_layer=2, n_heads=4, d_intermediate=128,
                            position_embedding="learned", max_position_embeddings=TASK.seq_len)
TEACHER_STEPS, KD_STEPS, EVAL_EVERY, LAYERS = 300, 30, 10, (0,)
FRESH = dict(conv_init="fresh", ssm_init="fresh", gate_init="fresh")
KD = KDConfig(kind="forward_kl", w_kl=1.0, w_ce=0.0)


def measure(seed: int):
    """Trains the teacher (seed), builds the three students, runs stage 1 for the two that train.

    Returns {"teacher_accuracy": float, name: {"kl0": held-out KL(teacher ‖ student) before training,
    "accuracy": held-out answer accuracy at steps 0, 10, 20, 30, "train_kl": the KL of each stage-1 step}}
    for name in "attention" (the defaults), "random" (the student's own Mamba-2 init), "mambainllama"
    (only x, B, C, out_proj copied, the rest fresh; kl0 only).
    """
    teacher = TransformerLM(TEACHER)
    data = make_dataset(TASK, seed=seed, batch_size=32, num_batches=TEACHER_STEPS)
    state = create_train_state(teacher.apply, init_params(teacher, jax.random.PRNGKey(seed)), make_optimizer(
        OptimizerConfig(learning_rate=3e-3, warmup_steps=20, total_steps=TEACHER_STEPS)))
    step = make_train_step()
    for i in range(TEACHER_STEPS):
        state, _ = step(state, get_batch(data, i))
    teacher_params = state.params
    held_out = get_batch(make_dataset(TASK, seed=seed, batch_size=128, num_batches=1, split="eval"), 0)
    kd_data = make_dataset(TASK, seed=seed + 500, batch_size=32, num_batches=KD_STEPS)
    kd_step = make_kd_train_step(teacher.apply, KD)
    out = {}
    students = {}     # one module, eval step and optimiser per config: attention and random share the compiles
    for name in ("attention", "random", "mambainllama"):
        rng = jax.random.PRNGKey(1000 + seed)
        if name == "random":        # the attention student with its mixer the Mamba-2 layer's own random init
            fresh = init_params(HybridLM(config), rng)
            params = {k: ({**v, "mixer": fresh[k]["mixer"]} if k in {f"layers_{i}" for i in LAYERS} else v)
                      for k, v in params.items()}
        else:
            options = FRESH if name == "mambainllama" else {}
            config, params = attention_to_mamba2(TEACHER, teacher_params, rng, layers=LAYERS, **options)
        if config not in students:
            student = HybridLM(config)
            students[config] = (student, make_kd_eval_step(student.apply, teacher.apply, KD),
                                freeze_except(optax.adam(3e-3), new_mixer_mask(config, params)))
        student, evaluate, tx = students[config]
        first = evaluate(params, teacher_params, held_out)
        run = dict(kl0=float(first["kl"]), accuracy=[float(first["accuracy"])], train_kl=[])
        if name != "mambainllama":
            # the step donates the state: train a copy, `params` stays for the random student
            state = create_train_state(student.apply, jax.tree_util.tree_map(jnp.copy, params), tx)
            for i in range(KD_STEPS):
                state, metrics = kd_step(state, teacher_params, get_batch(kd_data, i))
                run["train_kl"].append(float(metrics["kl"]))
                if (i + 1) % EVAL_EVERY == 0:
                    run["accuracy"].append(float(evaluate(state.params, teacher_params, held_out)["accuracy"]))
        out[name] = run
    teacher_logits = teacher.apply({"params": teacher_params}, held_out["inputs"])
    hit = (jnp.argmax(teacher_logits, -1) == held_out["targets"]) * held_out["loss_mask"]
    out["teacher_accuracy"] = float(jnp.sum(hit) / jnp.sum(held_out["loss_mask"]))
    return out


@pytest.fixture(scope="module")
def runs():
    return measure(0)


def _first_step_within(accuracy, target):
    """The first eval step (0, EVAL_EVERY, ...) whose accuracy reaches `target`; inf if none does."""
    return next((i * EVAL_EVERY for i, a in enumerate(accuracy) if a >= target), float("inf"))


def test_attention_init_starts_closer_to_the_teacher(runs):
    """Held-out KL(teacher ‖ student) before any training. Seeds 0-7: attention 0.723 / 3.057 / 0.820 /
    1.008 / 2.816 / 3.016 / 0.600 / 0.945, random 2.695 / 3.350 / 4.003 / 2.810 / 3.375 / 3.370 / 3.299 /
    3.466 (random / attention ≥ 1.10 on every seed, 3.73 on seed 0, the test's): margin 1.05. MambaInLlama's
    all-fresh setting 4.405 / 4.684 / 3.860 / 3.778 / 3.958 / 3.419 / 4.253 / 4.496 (≥ 1.13 × the attention
    default's on every seed, 6.1 on seed 0; above the random mixer's on 7 of 8): margin 1.05."""
    att, rnd, mil = runs["attention"]["kl0"], runs["random"]["kl0"], runs["mambainllama"]["kl0"]
    assert np.isfinite([att, rnd, mil]).all()
    assert rnd > 1.05 * att, (att, rnd)
    assert mil > 1.05 * att, (mil, att)


def test_attention_init_recovers_the_teacher_faster(runs):
    """Stage 1 (only the new mixer trains, forward KL, Adam 3e-3), 30 steps. Seeds 0-7: mean training KL
    attention 0.144 / 0.428 / 0.305 / 0.182 / 0.356 / 0.468 / 0.205 / 0.162, random 0.685 / 1.140 / 1.389 /
    0.646 / 1.053 / 1.151 / 0.984 / 0.815 (ratio ≥ 2.46, 4.78 on seed 0): margin 2. The held-out answer
    accuracy reaches the teacher's − 0.1 at eval step 0 / 10 / 20 / 0 / 10 / 10 / 10 / 0 (attention), and
    at never / never / never / 10 / never / never / never / 10 within 30 steps (random)."""
    att, rnd = runs["attention"], runs["random"]
    assert len(att["train_kl"]) == len(rnd["train_kl"]) == KD_STEPS
    assert np.mean(rnd["train_kl"]) > 2.0 * np.mean(att["train_kl"]), (np.mean(rnd["train_kl"]),
                                                                        np.mean(att["train_kl"]))
    target = runs["teacher_accuracy"] - 0.1
    assert _first_step_within(att["accuracy"], target) < _first_step_within(rnd["accuracy"], target), (
        target, att["accuracy"], rnd["accuracy"])
