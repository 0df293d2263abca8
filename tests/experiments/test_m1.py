"""M1 pipeline: M1's attention placement, maj@k and the claims against hand computations, and the `smoke`
preset end to end (`mamba-jax run m1 --preset smoke`), asserting on the results it writes and on resuming."""
import json
import os

import numpy as np
import pytest

from experiments.m1.config import M1Config, m1_attention_layers, preset_config
from experiments.m1.run import claims_of, maj_at_k, maj_at_k_resampled, samples_in_budget
from mamba_jax.cli import main as cli_main


def test_attention_placement_is_m1s_at_28_layers():
    assert m1_attention_layers(28) == (3, 8, 13, 18, 23, 27)        # M1-3B's attention layers
    assert m1_attention_layers(5) == (3, 4) and m1_attention_layers(2) == (1,)
    config = preset_config("cpu")
    assert config.replaced_layers == tuple(i for i in range(config.n_layer) if i not in config.kept_attention)
    assert M1Config(attention_layers="0,2").kept_attention == (0, 2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mamba_form"):
        M1Config(mamba_form="mamba3")
    with pytest.raises(ValueError, match="maj_ks"):
        M1Config(maj_ks="1,64", eval_samples=16)
    with pytest.raises(ValueError, match="grpo_prompts"):
        M1Config(grpo_prompts=5, updates_per_rollout=2)
    with pytest.raises(ValueError, match="attention_layers"):
        M1Config(attention_layers="9")
    with pytest.raises(ValueError, match="ssm_init"):
        M1Config(ssm_init="linear")


def test_student_init_options_reach_the_mamba_layers():
    """The default (MambaInLlama's): only x, B, C and out_proj come from the attention — the conv and A stay
    the fresh Mamba init; identity / linear_attention set them as `attention_to_mamba1` documents."""
    import jax

    from experiments.m1.run import student_from_teacher, teacher_model
    from mamba_jax.distill.attention_init import LINEAR_ATTENTION_DECAY
    from mamba_jax.models import init_params

    config = preset_config("smoke")
    teacher = teacher_model(config)
    teacher_params = init_params(teacher, jax.random.PRNGKey(0))
    layer = f"layers_{config.replaced_layers[0]}"
    fresh = student_from_teacher(config, teacher, teacher_params)[1][layer]["mixer"]
    options = dict(conv_init="identity", ssm_init="linear_attention", gate_init="open")
    set_ = student_from_teacher(M1Config(**{**config.to_dict(), **options}), teacher, teacher_params)[1][layer]["mixer"]
    np.testing.assert_array_equal(set_["conv1d_kernel"][:-1], 0)
    np.testing.assert_array_equal(set_["conv1d_kernel"][-1], 1)
    np.testing.assert_allclose(np.exp(set_["A_log"]), LINEAR_ATTENTION_DECAY, rtol=1e-6)
    assert np.abs(np.asarray(fresh["conv1d_kernel"][:-1])).max() > 0          # fresh conv taps
    assert np.ptp(np.asarray(fresh["A_log"])) > 1                             # fresh A: log(1..n) per state
    for name in ("in_proj_xb", "out_proj"):                                   # from the attention in both
        np.testing.assert_array_equal(fresh[name]["kernel"], set_[name]["kernel"])


def test_maj_at_k_by_hand():
    # problem 0 (truth 5): samples 5 5 3 None -> maj@1: 2 of 4 groups right; maj@2: (5 5) right, (3 None) wrong;
    # maj@4: 5. problem 1 (truth 7): 1 7 7 2 -> maj@1 2/4; maj@2: (1 7) tie -> 1 (first) wrong, (7 2) -> 7 right;
    # maj@4: 7
    answers = np.array([[5, 5, 3, None], [1, 7, 7, 2]], object)
    assert maj_at_k(answers, [5, 7], 1) == 0.5
    assert maj_at_k(answers, [5, 7], 2) == 0.5
    assert maj_at_k(answers, [5, 7], 4) == 1.0


def test_maj_at_k_resampled_by_hand():
    """k = 1: the share of right samples (resampling converges to it: 2000 draws within 0.03); k = n: the
    vote of the whole pool; k = 0: nothing in the budget scores 0; the budget conversion floors."""
    answers = np.array([[5, 5, 3, None], [1, 7, 7, 2]], object)
    rng = np.random.default_rng(0)
    assert maj_at_k_resampled(answers, [5, 7], 1, rng, draws=2000) == pytest.approx(0.5, abs=0.03)
    assert maj_at_k_resampled(answers, [5, 7], 4, rng) == 1.0
    assert maj_at_k_resampled(answers, [5, 7], 0, rng) == 0.0
    with pytest.raises(ValueError, match="`k` must lie in"):
        maj_at_k_resampled(answers, [5, 7], 5, rng)
    assert samples_in_budget(0.5, 10.0, 32) == 5 and samples_in_budget(0.099, 10.0, 32) == 0
    assert samples_in_budget(100.0, 10.0, 32) == 32


def test_claims_compare_what_the_issue_asks():
    stage = lambda p, m: {"pass@1": p, "maj@4": m}  # noqa: E731
    stages = {"teacher": stage(0.6, 0.7), "sft": stage(0.55, 0.6), "grpo_seed0": stage(0.65, 0.7),
              "grpo_seed1": stage(0.62, 0.7)}
    c = claims_of(stages, (1, 4))
    assert [x["holds"] for x in c] == [True, True, True]      # 0.55 >= 0.54; gains 0.10, 0.07 > spread 0.03
    stages["grpo_seed1"] = stage(0.56, 0.5)                    # gain 0.01 < spread 0.09; maj@4 below pass@1
    assert [x["holds"] for x in claims_of(stages, (1, 4))] == [True, False, False]


def test_smoke_run_writes_results_and_resumes(tmp_path):
    out = str(tmp_path / "m1")
    assert cli_main(["run", "m1", "--preset", "smoke", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert list(results["stages"]) == ["teacher", "student at init", "distill", "sft", "grpo_seed0"]
    for name, r in results["stages"].items():
        for key in ("pass@1_greedy", "pass@1", "maj@1", "maj@4", "well_formed"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert r["maj@1"] == pytest.approx(r["pass@1"]), name      # one-sample groups: the same thing
        assert 0 < r["mean_length"] <= preset_config("smoke").max_new_tokens
    assert results["stages"]["distill"]["params"] == results["stages"]["grpo_seed0"]["params"]
    assert [c["claim"][:8] for c in results["claims"]] == ["distille", "GRPO rai", "maj@4 ab"]
    records = [json.loads(line) for line in open(os.path.join(out, "grpo_seed0", "metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert 0.0 <= r["reward"] <= 1.0 and np.isfinite(r["loss"]) and 0.0 <= r["clip_fraction"] <= 1.0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    for name in ("results.md", "grpo_curves.png", "accuracy_vs_k.png", "accuracy_vs_time.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    fixed = results["fixed_time"]
    assert list(fixed["samples_per_s"]) == ["teacher", "student (grpo_seed0)"] and fixed["pool"] == 4
    assert all(r > 0 for r in fixed["samples_per_s"].values()) and len(fixed["curve"]) == 4
    for name, rate in fixed["samples_per_s"].items():   # the samples each budget buys follow the throughput
        assert [p[name]["k"] for p in fixed["curve"]] == [min(4, int(np.floor(p["budget_s"] * rate + 1e-9)))
                                                          for p in fixed["curve"]]
    assert fixed["curve"][-1]["teacher"]["k"] == fixed["curve"][-1]["student (grpo_seed0)"]["k"] == 4
    # a second run in the same folder resumes: every stage loads from its checkpoint, the results agree
    assert cli_main(["run", "m1", "--preset", "smoke", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    assert again["stages"] == results["stages"]
    assert [json.loads(line) for line in open(os.path.join(out, "grpo_seed0", "metrics.jsonl"))] == records


def test_an_hf_llama_teacher_brings_its_shape_and_tokenizer(tmp_path):
    """teacher=PATH: a Llama checkpoint in the HF layout with its tokenizer.json; the problems are encoded
    by its (subword) tokenizer and SFT still predicts exactly the completion and EOS."""
    import jax

    from experiments.m1.run import ReasoningData, load_teacher, student_from_teacher
    from mamba_jax.data import HFTokenizer, train_bpe_tokenizer
    from mamba_jax.interop import save_hf
    from mamba_jax.models import TransformerConfig, TransformerLM, init_params

    smoke = preset_config("smoke")
    texts = [p.prompt + p.completion for p in smoke.task.problems(0, 300)]
    bpe = train_bpe_tokenizer(texts, vocab_size=300)
    model = TransformerLM(TransformerConfig(vocab_size=bpe.vocab_size, d_model=32, n_layer=3, n_heads=2, n_kv_heads=1,
                                            d_intermediate=48))
    folder = tmp_path / "llama"
    save_hf(model, init_params(model, jax.random.PRNGKey(0)), str(folder))
    bpe.save(str(folder))
    raw = json.loads((folder / "config.json").read_text())
    raw.update(bos_token_id=bpe.bos_id, eos_token_id=[bpe.eos_id])
    (folder / "config.json").write_text(json.dumps(raw))

    config, teacher, params, tok = load_teacher(M1Config(**{**smoke.to_dict(), "teacher": str(folder),
                                                            "teacher_steps": 0}))
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.eos_id)
    assert (config.n_layer, config.d_model, config.n_heads, config.n_kv_heads) == (3, 32, 2, 1)
    assert config.kept_attention == (2,) and teacher.config.head_dim_value == 16 and params is not None
    data = ReasoningData(config, tok)
    rows, problem = data.rows, data.train[0]
    first = rows["seq_idx"][0] == 0
    assert tok.decode(rows["input_ids"][0][first]) == problem.prompt + problem.completion
    targets = rows["targets"][0][first & rows["loss_mask"][0]]
    assert tok.decode(targets[:-1]) == problem.completion and targets[-1] == tok.eos_id
    assert len(tok.encode(problem.completion)) < len(problem.completion)     # subwords ("=-", ";#-"), not characters
    student, student_params = student_from_teacher(config, teacher, params)
    assert student.config.layer_kinds == ("M", "M", "A")
    with pytest.raises(ValueError, match="teacher_steps"):
        M1Config(teacher_steps=0)
