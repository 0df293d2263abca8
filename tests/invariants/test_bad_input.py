"""Bad input is refused with an error that names the argument, the value and what was expected — or, where
it is legitimate (padding may hold any id, or NaN), it reaches no real position. One test per row of the
README's bad-input table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.inference import generate, prefill, step
from mamba_jax.layers.mamba import MambaConfig
from mamba_jax.layers.mamba2 import Mamba2Config
from mamba_jax.layers.moe import MoEBlockConfig, MoEConfig
from mamba_jax.train import (Checkpointer, LoopConfig, NonFiniteLossError, create_train_state, make_eval_step,
                             make_train_step, masked_token_stats, train_loop)
from tests.invariants.families import VOCAB, model_and_params, tokens

MAMBA = "M[chunked]"


def test_token_ids_outside_the_vocabulary_are_named():
    model, params = model_and_params(MAMBA)
    ids = np.asarray(tokens(0, 2, 8))
    for bad, pos in ((VOCAB + 9, (1, 3)), (-1, (0, 0)), (VOCAB, (0, 7))):   # VOCAB: a padding row of the table
        x = ids.copy()
        x[pos] = bad
        match = rf"`input_ids` holds the id {bad} at position \({pos[0]}, {pos[1]}\), outside the vocabulary \[0, vocab_size={VOCAB}\)"
        with pytest.raises(ValueError, match="MambaLM: " + match):
            model.apply({"params": params}, jnp.asarray(x))
        with pytest.raises(ValueError, match="prefill: " + match):
            prefill(model, params, jnp.asarray(x))
    with pytest.raises(ValueError, match=r"generate: `prompt_ids` holds the id 99 at position \(0, 0\)"):
        generate(model, params, jnp.asarray(ids).at[0, 0].set(99), 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"step: `token_ids` holds the id -3 at position \(1,\)"):
        step(model, params, jnp.asarray([1, -3]), prefill(model, params, jnp.asarray(ids))[1])


def test_ids_under_jit_are_clipped_not_read_from_padding_rows():
    """Inside jit the ids cannot be checked: they are clipped into [0, vocab_size), so an id in the padded
    part of the table [vocab_size, padded_vocab) or beyond reads the last real row, never a padding row
    (or NaN, or a wrapped negative index)."""
    model, params = model_and_params(MAMBA)
    apply = jax.jit(model.apply)
    x = tokens(0, 1, 8)
    want = apply({"params": params}, x.at[0, 5].set(VOCAB - 1))
    for bad in (VOCAB, VOCAB + 2, 10_000):
        np.testing.assert_array_equal(apply({"params": params}, x.at[0, 5].set(bad)), want)
    np.testing.assert_array_equal(apply({"params": params}, x.at[0, 5].set(-7)), apply({"params": params}, x.at[0, 5].set(0)))


@pytest.mark.parametrize("name", [MAMBA, "M2[chunked]", "A[rope,gqa]"])
def test_any_pad_id_with_a_correct_mask_gives_the_unpadded_logits(name):
    """Eager apply: padding may hold any id (here 10_000 and -1), only real tokens are checked; the real
    positions equal the unpadded row. (Before the fix: NaN at every real position.)"""
    model, params = model_and_params(name)
    x = tokens(1, 1, 8)
    padded = jnp.concatenate([jnp.asarray([[10_000, -1, 10_000]]), x], axis=1)
    mask = jnp.asarray([[0, 0, 0] + [1] * 8])
    got = model.apply({"params": params}, padded, mask=mask)[:, 3:]
    want = model.apply({"params": params}, x)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.abs(want).max()))


def test_mask_values_other_than_0_and_1_are_named():
    model, params = model_and_params(MAMBA)
    x = tokens(0, 2, 4)
    with pytest.raises(ValueError, match=r"MambaLM: `mask` must hold only 0 and 1 .* got 0\.5 at position \(1, 2\)"):
        model.apply({"params": params}, x, mask=jnp.asarray([[1, 1, 1, 1], [0, 1, 0.5, 1]]))
    with pytest.raises(ValueError, match=r"prefill: `mask` must hold only 0 and 1 .* got 2 at position \(0, 1\)"):
        prefill(model, params, x, mask=jnp.asarray([[1, 2, 1, 1], [1, 1, 1, 1]]))


def test_right_padded_prompt_mask_is_refused():
    model, params = model_and_params(MAMBA)
    x = tokens(0, 2, 5)
    with pytest.raises(ValueError, match=r"generate: `prompt_mask` must be left-padded .* row 1 is \[1, 1, 1, 0, 0\]"):
        generate(model, params, x, 2, temperature=0.0, prompt_mask=jnp.asarray([[1] * 5, [1, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"row 0 is \[0, 1, 0, 1, 1\]"):     # inner padding
        generate(model, params, x, 2, temperature=0.0, prompt_mask=jnp.asarray([[0, 1, 0, 1, 1], [1] * 5]))


def test_kv_cache_overflow_is_an_error():
    model, params = model_and_params("A[rope,gqa]")
    from mamba_jax.models.lm import init_cache
    _, cache = prefill(model, params, tokens(0, 1, 6), init_cache(model.config, 1, 7))
    _, cache = step(model, params, jnp.asarray([3]), cache)
    with pytest.raises(ValueError, match=r"step: the KV cache holds 7 slots, 7 of them used: no room for 1 more token\(s\)"):
        step(model, params, jnp.asarray([3]), cache)


def test_learned_positions_past_the_table_are_refused():
    model, params = model_and_params("A[learned]")          # max_position_embeddings = 64
    with pytest.raises(ValueError, match=r"TransformerLM: 65 tokens exceed the 64 learned position embeddings"):
        model.apply({"params": params}, tokens(0, 1, 65))
    with pytest.raises(ValueError, match=r"generate: the prompt \(60 real tokens\) and 5 new tokens exceed the model's 64"):
        generate(model, params, tokens(0, 1, 60), 5, temperature=0.0)
    _, cache = prefill(model, params, tokens(0, 1, 40), max_len=100)     # room in the cache, not in the table
    with pytest.raises(ValueError, match=r"prefill: 80 positions exceed the model's 64 learned position embeddings"):
        prefill(model, params, tokens(1, 1, 40), cache)


@pytest.mark.parametrize("config, match", [
    (lambda: MambaConfig(dt_min=0.1, dt_max=0.01), r"MambaConfig: need `dt_min` <= `dt_max`"),
    (lambda: MambaConfig(dt_min=0.0), r"MambaConfig: `dt_min` must be a number > 0"),
    (lambda: Mamba2Config(dt_min=-1e-3), r"Mamba2Config: `dt_min` must be a number > 0"),
    (lambda: Mamba2Config(dt_limit_min=0.5, dt_limit_max=0.1), r"Mamba2Config: need 0 <= `dt_limit_min` < `dt_limit_max`"),
    (lambda: MoEBlockConfig(moe=MoEConfig(router="expert_choice")), r"MoEBlockConfig: router='expert_choice' is not causal"),
])
def test_bad_configs_are_named(config, match):
    with pytest.raises(ValueError, match=match):
        config()


def test_masked_targets_never_reach_the_loss_and_real_ones_must_be_in_range():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, VOCAB))
    targets = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], bool)
    clean = masked_token_stats(logits, targets, mask)
    poisoned = masked_token_stats(logits.at[0, 2].set(jnp.nan), targets.at[0, 4].set(VOCAB + 5).at[1, 1].set(-1), mask)
    for k in clean:
        np.testing.assert_allclose(poisoned[k], clean[k], rtol=1e-6, err_msg=k)
    grad = jax.grad(lambda lg: masked_token_stats(lg, targets.at[0, 4].set(VOCAB + 5), mask)["nll_sum"])(logits)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[0, 4]).max()) == 0.0
    assert np.isnan(float(masked_token_stats(logits, targets.at[1, 3].set(VOCAB), mask)["nll_sum"]))  # a real one


def test_eval_step_checks_host_batches():
    model, params = model_and_params(MAMBA)
    ids = np.asarray(tokens(0, 2, 6))
    batch = {"inputs": ids, "targets": ids.copy(), "loss_mask": np.ones((2, 6), bool)}
    batch["targets"][1, 4] = VOCAB + 1
    with pytest.raises(ValueError, match=r"eval_step: `batch\['targets'\]` holds the id 62 at position \(1, 4\)"):
        make_eval_step(model.apply)(params, batch)
    batch["loss_mask"][1, 4] = False                           # masked: any id is fine
    make_eval_step(model.apply)(params, batch)


def test_nan_loss_stops_the_loop_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    """A batch whose real target is outside the vocabulary at step 7 makes the loss NaN: the loop raises
    NonFiniteLossError naming step 7 and checkpoint 4, and saves nothing after it."""
    model, params = model_and_params(MAMBA)
    state = create_train_state(model.apply, jax.tree_util.tree_map(jnp.copy, params), optax.sgd(1e-3))
    rng = np.random.default_rng(0)

    def get_batch(i):
        ids = rng.integers(0, VOCAB, (2, 9)).astype(np.int32)
        b = {"inputs": ids[:, :-1], "targets": ids[:, 1:].copy(), "loss_mask": np.ones((2, 8), bool)}
        if i == 6:      # step 7
            b["targets"][0, 3] = VOCAB + 3
        return b

    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    config = LoopConfig(num_steps=12, log_every=2, eval_every=100, checkpoint_every=4, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 7; .*\(the last good checkpoint is step 4 in ") as info:
        train_loop(state, make_train_step(), get_batch, config, checkpointer=ckpt)
    assert (info.value.step, info.value.last_checkpoint) == (7, 4)
    assert ckpt.all_steps() == (4,)
    ckpt.close()
