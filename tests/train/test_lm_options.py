"""The `lm` experiment's training keys: lr_schedule, grad_accum_steps, compute_dtype, tensorboard —
validation naming the key, what they build, and one short end-to-end run with all of them."""
import jax
import jax.numpy as jnp
import pytest

from experiments.lm import run
from experiments.lm.config import apply_overrides, preset_config
from mamba_jax.train import learning_rate_schedule, read_jsonl, read_tensorboard_scalars

SMOKE = preset_config("smoke", "selective_copy")


@pytest.mark.parametrize("overrides,key", [
    ({"grad_accum_steps": "3"}, "grad_accum_steps"),     # does not divide batch_size 8
    ({"grad_accum_steps": "0"}, "grad_accum_steps"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"tensorboard": "maybe"}, "tensorboard"),
])
def test_bad_values_name_their_key(overrides, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        apply_overrides(SMOKE, overrides)


def test_keys_reach_the_model_and_the_optimizer():
    config = apply_overrides(SMOKE, {"compute_dtype": "bfloat16", "lr_schedule": "linear", "grad_accum_steps": "4"})
    assert (config.model_config().dtype, config.model_config().param_dtype) == ("bfloat16", "float32")
    assert config.optimizer_config().lr_schedule == "linear"
    _, state = run.build_train_state(config)
    assert {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_a_run_with_accumulation_bf16_and_a_linear_schedule(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--out", str(out), "num_steps=6", "log_every=2", "checkpoint_every=6",
            "eval_every=6", "warmup_steps=2", "grad_accum_steps=2", "compute_dtype=bfloat16", "lr_schedule=linear"]
    assert run.main(argv) == 0
    config = apply_overrides(SMOKE, dict(a.split("=") for a in argv[4:]))
    train = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["kind"] == "train"]
    schedule = learning_rate_schedule(config.optimizer_config())
    # each record holds the window mean of the learning rates used at steps (s-2, s-1) (0-based)
    expected = [(float(schedule(s - 2)) + float(schedule(s - 1))) / 2 for s in (2, 4, 6)]
    assert [r["learning_rate"] for r in train] == pytest.approx(expected, rel=1e-6)
    assert all(r["loss"] > 0 for r in train)
    scalars = read_tensorboard_scalars(str(out / "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6] and [s for s, _ in scalars["eval/accuracy"]] == [6]
    assert (out / "results.json").exists()
    no_tb = tmp_path / "no_tb"
    assert run.main(["--preset", "smoke", "--out", str(no_tb), "num_steps=2", "log_every=2", "checkpoint_every=2",
                     "eval_every=2", "warmup_steps=1", "tensorboard=false"]) == 0
    assert not (no_tb / "tensorboard").exists()


def test_seq_idx_reaches_the_model_in_the_train_and_eval_steps():
    """A packed row with seq_idx scores each document as if it were alone (checked against per-document
    forward passes), differently from the same row without seq_idx; also through grad accumulation."""
    import numpy as np
    import optax

    from mamba_jax.layers import MambaConfig
    from mamba_jax.models import MambaLM, init_params
    from mamba_jax.train import create_train_state, make_eval_step, make_train_step
    from tests.invariants.families import trained_scale

    model = MambaLM(MambaConfig(vocab_size=11, d_model=16, n_layer=1, d_state=4, param_dtype="float32"))
    # trained-scale parameters: at initialisation the state barely moves the logits, so whether it resets
    # at a document boundary would hardly show
    params = trained_scale(init_params(model, jax.random.PRNGKey(0), seq_len=12))
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 11, (2, 12)).astype(np.int32)
    targets = rng.integers(0, 11, (2, 12)).astype(np.int32)
    seq_idx = np.int32([[0] * 4 + [1] * 8, [0] * 8 + [1] * 4])   # row 0: documents of 4, 8; row 1: 8, 4
    mask = np.ones((2, 12), bool)

    # independent reference: each document through the model on its own (the two of each length together)
    nll = 0.0
    for docs in ([(0, slice(0, 4)), (1, slice(8, 12))], [(0, slice(4, 12)), (1, slice(0, 8))]):
        x = jnp.asarray(np.stack([inputs[r, s] for r, s in docs]))
        y = jnp.asarray(np.stack([targets[r, s] for r, s in docs]))
        logits = model.apply({"params": params}, x)
        nll += float(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).sum())
    per_document = nll / mask.sum()

    packed = {"inputs": inputs, "targets": targets, "loss_mask": mask, "seq_idx": seq_idx}
    unpacked = {k: v for k, v in packed.items() if k != "seq_idx"}
    eval_step = make_eval_step(model.apply)
    with_idx = eval_step(params, packed)
    without = eval_step(params, unpacked)
    assert float(with_idx["nll_sum"]) / 24 == pytest.approx(per_document, rel=1e-5)
    assert abs(float(without["nll_sum"]) / 24 - per_document) > 1e-3

    state = create_train_state(model.apply, params, optax.sgd(0.0))
    for k in (1, 2):                                  # k = 2: one row per micro-batch
        _, metrics = make_train_step(donate=False, grad_accum_steps=k)(state, packed)
        assert float(metrics["loss"]) == pytest.approx(per_document, rel=1e-5)
