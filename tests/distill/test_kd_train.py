"""The teacher–student step: the teacher never changes, frozen parameters never change, the loss is the
one `kd_loss` defines, stored top-k teacher outputs (k = V) give the same step as on-the-fly logits."""
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
    kd_loss,
    make_kd_eval_step,
    make_kd_train_step,
    new_mixer_mask,
)
from mamba_jax.layers.attention import TransformerConfig
from mamba_jax.models import TransformerLM, init_params
from mamba_jax.models.hybrid import HybridLM
from mamba_jax.train import create_train_state

TASK = MQARTask(seq_len=16, num_kv_pairs=2, vocab_size=16)
TEACHER = TransformerConfig(vocab_size=TASK.vocab_size, d_model=32, n_layer=2, n_heads=4, d_intermediate=48)


@pytest.fixture(scope="module")
def setup():
    teacher = TransformerLM(TEACHER)
    teacher_params = init_params(teacher, jax.random.PRNGKey(0))
    config, student_params = attention_to_mamba2(TEACHER, teacher_params, jax.random.PRNGKey(1), layers=[0])
    data = make_dataset(TASK, seed=0, batch_size=4, num_batches=6)
    return dict(teacher=teacher, teacher_params=teacher_params, config=config, student=HybridLM(config),
                student_params=student_params, batches=[get_batch(data, i) for i in range(6)])


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def test_stage_one_trains_only_the_new_mixers_and_never_the_teacher(setup):
    teacher_before = _copy(setup["teacher_params"])
    mask = new_mixer_mask(setup["config"], setup["student_params"])
    state = create_train_state(setup["student"].apply, _copy(setup["student_params"]),
                               freeze_except(optax.adam(1e-2), mask))
    step = make_kd_train_step(setup["teacher"].apply, KDConfig(kind="forward_kl", w_kl=0.1, w_ce=1.0))
    losses = []
    for batch in setup["batches"]:
        state, metrics = step(state, setup["teacher_params"], batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["loss"]) == pytest.approx(0.1 * float(metrics["kl"]) + float(metrics["ce"]), rel=1e-5)
    assert losses[-1] < losses[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, setup["teacher_params"], teacher_before)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     state.params, setup["student_params"])
    assert jax.tree_util.tree_leaves(changed) and jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda c, m: c == m, changed, mask))         # changed exactly where trainable


def test_step_metrics_equal_kd_loss_on_the_teachers_logits(setup):
    config = KDConfig(kind="reverse_kl", w_kl=1.0, w_ce=0.5, temperature=2.0)
    batch = setup["batches"][0]
    evaluate = make_kd_eval_step(setup["student"].apply, setup["teacher"].apply, config)
    got = evaluate(setup["student_params"], setup["teacher_params"], batch)
    s = setup["student"].apply({"params": setup["student_params"]}, batch["inputs"])
    t = setup["teacher"].apply({"params": setup["teacher_params"]}, batch["inputs"])
    want = kd_loss(s, batch["targets"], teacher_logits=t, kind="reverse_kl", w_kl=1.0, w_ce=0.5, temperature=2.0,
                   mask=batch["loss_mask"])[1]
    # The jitted step and the eager forward round differently (float32 logits agree to ~1e-6 relative). The
    # KL of two near-equal distributions is a difference of O(log V) log-probabilities, so its rounding error
    # is absolute, ~1e-6 here, however small the KL itself (0.0038 on this batch): hence abs=1e-6.
    for key in ("loss", "kl", "ce", "accuracy"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6)


def test_stored_top_k_outputs_give_the_on_the_fly_step(setup):
    batch = setup["batches"][1]
    t = setup["teacher"].apply({"params": setup["teacher_params"]}, batch["inputs"])
    values, indices = jax.lax.top_k(t, t.shape[-1])                           # k = V: the whole distribution
    stored = dict(batch, teacher_topk_logits=values, teacher_topk_indices=indices)
    config = KDConfig(kind="forward_kl", w_kl=1.0, w_ce=0.0)
    results = []
    for b, teacher_params in ((batch, setup["teacher_params"]), (stored, None)):
        state = create_train_state(setup["student"].apply, _copy(setup["student_params"]), optax.sgd(0.1))
        state, metrics = make_kd_train_step(setup["teacher"].apply, config)(state, teacher_params, b)
        results.append((float(metrics["loss"]), state.params))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           results[0][1], results[1][1])


def test_bf16_teacher_and_config_errors(setup):
    batch = setup["batches"][2]
    f32 = make_kd_eval_step(setup["student"].apply, setup["teacher"].apply, KDConfig())
    bf16 = make_kd_eval_step(setup["student"].apply, setup["teacher"].apply, KDConfig(teacher_dtype="bfloat16"))
    a = float(f32(setup["student_params"], setup["teacher_params"], batch)["kl"])
    b = float(bf16(setup["student_params"], setup["teacher_params"], batch)["kl"])
    assert np.isfinite(b) and a != b and b == pytest.approx(a, rel=0.05)   # bf16 rounding of the teacher only
    for bad, match in ((dict(kind="kl"), "kind"), (dict(teacher_dtype="float16"), "teacher_dtype"),
                       (dict(w_kl=0.0, w_ce=0.0), "nothing to train"), (dict(w_kl=-1.0), "w_kl")):
        with pytest.raises(ValueError, match=match):
            KDConfig(**bad)


def test_stage_two_continues_stage_one_end_to_end_on_reverse_kl(setup):
    from mamba_jax.distill import STAGE1_KD, STAGE2_KD, start_stage2

    teacher_before = _copy(setup["teacher_params"])
    mask = new_mixer_mask(setup["config"], setup["student_params"])
    state = create_train_state(setup["student"].apply, _copy(setup["student_params"]),
                               freeze_except(optax.adam(1e-2), mask))
    stage1 = make_kd_train_step(setup["teacher"].apply, STAGE1_KD)
    for batch in setup["batches"][:3]:
        state, _ = stage1(state, setup["teacher_params"], batch)
    after_stage1 = _copy(state.params)

    state = start_stage2(state, optax.adam(1e-2))
    assert int(state.step) == 3
    stage2 = make_kd_train_step(setup["teacher"].apply, STAGE2_KD)
    evaluate = make_kd_eval_step(setup["student"].apply, setup["teacher"].apply, STAGE2_KD)
    probe = setup["batches"][0]
    kl_before = float(evaluate(state.params, setup["teacher_params"], probe)["kl"])
    for _ in range(4):
        for batch in setup["batches"]:
            state, metrics = stage2(state, setup["teacher_params"], batch)
            assert float(metrics["loss"]) == pytest.approx(float(metrics["kl"]), rel=1e-6)   # w_ce = 0
    assert int(state.step) == 3 + 4 * len(setup["batches"])
    # reverse KL(student ‖ teacher) on a batch it trained on goes down
    assert float(evaluate(state.params, setup["teacher_params"], probe)["kl"]) < 0.8 * kl_before
    # end to end: the parameters stage 1 froze (embeddings, kept attention, MLPs) move too; the teacher never
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     state.params, after_stage1)
    assert all(jax.tree_util.tree_leaves(changed))
    jax.tree_util.tree_map(np.testing.assert_array_equal, setup["teacher_params"], teacher_before)
