"""`mamba-jax run moe_mamba`: the steps-to-loss speedup on hand-made curves, the arm names, bad keys, and the
`smoke` preset end to end (Mamba vs MoE-Mamba on byte-level text), asserting on the files it writes."""
import json
import math

import numpy as np
import pytest

from experiments.moe_mamba import run
from experiments.moe_mamba.config import MoEMambaConfig, arm_settings, preset_config
from mamba_jax import cli
from mamba_jax.layers.config import MAMBA, MOE
from mamba_jax.train import read_jsonl

SMOKE = preset_config("smoke")
PNG = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------------- speedup measure


def test_a_curve_stretched_twice_in_steps_gives_speedup_two():
    values = 1.0 + 4.0 * np.exp(-np.arange(101) / 20.0)      # decreasing from 5 to ~1.03
    moe = (np.arange(101.0), values)                         # the same losses in half the steps
    mamba = (2.0 * np.arange(101.0), values)
    for level in (4.5, 3.0, 2.0, 1.2):
        assert run.speedup_at(mamba, moe, level) == pytest.approx(2.0, rel=1e-12)
    assert run.speedup_curve(mamba, moe, [3.0, 1.5]) == pytest.approx([2.0, 2.0], rel=1e-12)
    assert run.speedup_at(moe, mamba, 2.0) == pytest.approx(0.5, rel=1e-12)


def test_steps_to_reach_interpolates_and_says_not_reached():
    assert run.steps_to_reach([0, 10], [5.0, 3.0], 4.0) == pytest.approx(5.0)       # halfway between
    assert run.steps_to_reach([0, 10, 20], [5.0, 3.0, 1.0], 1.5) == pytest.approx(17.5)
    assert run.steps_to_reach([3, 10], [2.0, 1.0], 4.0) == 3.0                    # already there at the start
    assert run.steps_to_reach([0, 10, 20, 30], [5.0, 3.0, 6.0, 2.0], 4.0) == pytest.approx(5.0)   # first crossing
    assert run.steps_to_reach([0, 10], [5.0, 4.5], 4.0) == math.inf               # never reached
    never = ([0.0, 10.0], [5.0, 4.5])
    reaches = ([0.0, 10.0], [5.0, 3.0])
    assert math.isnan(run.speedup_at(reaches, never, 4.0))                        # the MoE arm: not reached
    assert run.speedup_at(never, reaches, 4.0) == math.inf                        # only the MoE arm reaches it
    with pytest.raises(ValueError, match="equal-length"):
        run.steps_to_reach([0, 1, 2], [1.0, 2.0], 1.0)


def test_compare_reads_the_levels_from_mamba_and_measures_each_moe_arm():
    """Hand-made records: Mamba logs every 2 steps (to 200) the losses the `moe` arm logs every step (to 100),
    so its curve is moe's stretched 2x (train and eval); `slow` never gets below 4.0. ema = 0: no smoothing."""
    g = lambda k: 1.0 + 4.0 * np.exp(-k / 25.0)

    def records(stride, f):
        return ([{"kind": "train", "step": stride * k, "loss": f(k)} for k in range(1, 101)]
                + [{"kind": "eval", "step": stride * k, "eval_loss": f(k) + 0.1} for k in range(10, 101, 10)])

    arms = [{"arm": "mamba", "records": records(2, g)}, {"arm": "moe", "records": records(1, g)},
            {"arm": "slow", "records": records(1, lambda k: 4.0 + g(k) / 10)}]
    result = run.compare(arms, ema=0.0)
    assert result["level"] == pytest.approx(g(100)) and result["eval_level"] == pytest.approx(g(100) + 0.1)
    assert result["mamba_steps_to_final"] == 200
    moe, slow = arms[1], arms[2]
    assert moe["speedup"] == pytest.approx(2.0) and moe["speedup_eval"] == pytest.approx(2.0)
    assert moe["steps_to_mamba_final"] == pytest.approx(100.0)
    assert moe["eval_steps_to_mamba_final"] == pytest.approx(100.0)
    assert slow["speedup"] is None and slow["speedup_eval"] is None and slow["steps_to_mamba_final"] is None
    # levels: from Mamba's loss at 10 % of its records (record 10: g(10)) down to its final loss
    assert result["levels"][0] == pytest.approx(g(10)) and result["levels"][-1] == pytest.approx(g(100))
    assert result["curves"]["moe"] == pytest.approx([2.0] * 40, rel=1e-9)
    assert result["curves"]["slow"] == [None] * 40 and "mamba" not in result["curves"]
    # against the one-expert control: an arm stretched 4x in steps is moe at 1/2 speed, moe 4x faster than it
    arms.append({"arm": "moe_e1", "records": records(4, g)})
    run.compare(arms, ema=0.0, baseline="moe_e1", suffix="_vs_e1")
    assert moe["speedup_vs_e1"] == pytest.approx(4.0) and moe["speedup_eval_vs_e1"] == pytest.approx(4.0)
    assert slow["speedup_vs_e1"] is None and "speedup_vs_e1" not in arms[0] and "speedup_vs_e1" not in arms[3]
    assert moe["steps_to_mamba_final"] == pytest.approx(100.0)          # the Mamba comparison is untouched


def test_ema_is_debiased():
    np.testing.assert_allclose(run.ema_smooth([4.0, 2.0], 0.5), [4.0, (0.25 * 4 + 0.5 * 2) / 0.75])
    np.testing.assert_allclose(run.ema_smooth([4.0, 2.0, 7.0], 0.0), [4.0, 2.0, 7.0])


# --------------------------------------------------------------------------------------- config, arms


def test_arm_names_and_their_models():
    assert arm_settings("mamba") == {"baseline": True} and arm_settings("moe") == {}
    assert arm_settings("moe_e16") == {"n_experts": 16} and arm_settings("moe_cf0.5") == {"capacity_factor": 0.5}
    assert arm_settings("moe_top2") == {"router": "topk"}
    with pytest.raises(ValueError, match="'moe_expert_choice' was removed: expert-choice routing .* not a valid causal"):
        arm_settings("moe_expert_choice")
    for bad in ("moe_e0", "moe_cf", "moe_top3", "dense"):
        with pytest.raises(ValueError, match="an arm is one of mamba, moe, moe_e<N>"):
            arm_settings(bad)
    base, moe = SMOKE.model_config("mamba"), SMOKE.model_config("moe")
    assert base.layer_kinds == (MAMBA,) * 2 and moe.layer_kinds == (MAMBA, MOE)
    top2 = SMOKE.model_config("moe_top2").mixer_config(MOE).moe
    assert (top2.router, top2.top_k, top2.n_experts) == ("topk", 2, 4)
    assert SMOKE.model_config("moe_cf2").mixer_config(MOE).moe.capacity_factor_train == 2.0
    assert SMOKE.model_config("moe").mixer_config(MOE).moe.expert_width(16) == 48           # 3·d_model
    wide = MoEMambaConfig(**{**SMOKE.to_dict(), "d_expert": 40})
    assert wide.model_config("moe_e16").mixer_config(MOE).moe.expert_width(16) == 40
    # `paper`: sizes from the paper setting
    paper = preset_config("paper")
    assert paper.sizes() == {"d_model": 512, "n_blocks": 8, "n_experts": 42}


@pytest.mark.parametrize("argv,message", [
    (["n_expert=8"], "unknown config key `n_expert`; did you mean n_experts"),
    (["arms=mamba,moe_e3x"], "unknown arm 'moe_e3x'"),
    (["arms=mamba,mamba"], "lists an arm twice"),
    (["arms=moe_top2", "n_experts=1"], "arm 'moe_top2'"),
    (["ema=1.5"], "`ema` must be a number in [0, 1)"),
    (["eval_every=7", "log_every=2"], "must be a multiple of `log_every`"),
])
def test_bad_keys_and_values_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "moe_mamba", "--preset", "smoke", "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if argv[0].startswith("n_expert="):
        assert "Valid keys:" in err and "arms" in err and "capacity_factor" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ smoke run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_smoke")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAMBA_JAX_CACHE", str(tmp_path_factory.mktemp("text_cache")))
        assert cli.main(["run", "moe_mamba", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_results_with_sound_values(smoke_run):
    out = smoke_run
    assert json.loads((out / "config.json").read_text()) == SMOKE.to_dict()
    results = json.loads((out / "results.json").read_text())
    arms = {a["arm"]: a for a in results["arms"]}
    assert list(arms) == ["mamba", "moe"]
    base, moe = arms["mamba"], arms["moe"]
    # same active parameters per token (within 10 %); the MoE model holds more in total (4 experts, top-1)
    assert abs(moe["params_active"] - base["params_active"]) <= 0.1 * base["params_active"]
    assert base["params_total"] == base["params_active"] and base["params_expert"] == 0
    assert moe["params_total"] - moe["params_active"] == moe["params_expert"] * 3 // 4
    for a in (base, moe):
        records = read_jsonl(str(out / "arms" / a["arm"] / "metrics.jsonl"))
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["step"] for r in train] == list(range(1, 17)) and [r["step"] for r in evals] == [8, 16]
        # the smoothed final loss is the debiased EMA of the logged losses, written out by hand
        losses = np.array([r["loss"] for r in train])
        weights = SMOKE.ema ** np.arange(15, -1, -1) * (1 - SMOKE.ema)
        assert a["final_train_loss"] == pytest.approx(float(weights @ losses / weights.sum()), rel=1e-9)
        assert a["final_eval_loss"] == evals[-1]["eval_loss"]
        assert 0 < a["final_eval_loss"] < math.log(259) + 0.5 and math.isfinite(a["final_train_loss"])
        assert a["tokens_per_s"] > 0
    assert base["dropped_fraction"] is None and 0.0 <= moe["dropped_fraction"] < 1.0
    # per MoE layer (the smoke model has one, "M E": layers_1); the run's mean equals the overall mean
    assert base["dropped_fraction_by_layer"] == {} and list(moe["dropped_fraction_by_layer"]) == ["layers_1"]
    assert moe["dropped_fraction_by_layer"]["layers_1"] == pytest.approx(moe["dropped_fraction"], abs=1e-9)
    # the headline speedup: at Mamba's final smoothed loss, > 0, or None when the MoE arm never got there
    cmp_ = results["comparison"]
    assert cmp_["level"] == base["final_train_loss"] and cmp_["eval_level"] == base["final_eval_loss"]
    moe_train = [r["loss"] for r in read_jsonl(str(out / "arms" / "moe" / "metrics.jsonl")) if r["kind"] == "train"]
    if moe["speedup"] is None:
        assert min(run.ema_smooth(moe_train, SMOKE.ema)) > cmp_["level"]
    else:
        assert moe["speedup"] > 0 and moe["steps_to_mamba_final"] <= 16
    curve = cmp_["curves"]["moe"]
    assert len(curve) == len(cmp_["levels"]) == 40 and cmp_["levels"][-1] == cmp_["level"]
    assert any(v is not None for v in curve) and all(v > 0 for v in curve if v is not None)
    table = (out / "results.md").read_text()
    assert f"| mamba | {base['params_total']:,} | {base['params_active']:,} |" in table
    assert f"| moe | {moe['params_total']:,} | {moe['params_active']:,} |" in table
    assert f"| {moe['final_train_loss']:.4f} |" in table and "2.35x" in table and "1.76x" in table
    for name in ("loss_vs_steps.png", "speedup_vs_loss.png"):
        png = (out / name).read_bytes()
        assert png[:8] == PNG and len(png) > 5000


def test_cpu_and_paper_presets_build():
    cpu = MoEMambaConfig()
    assert cpu.preset == "cpu" and "moe_top2" in cpu.arm_names() and cpu.arm_names()[0] == "mamba"
    assert preset_config("paper").lm_config().seq_len == 256


def test_routing_groups_are_the_whole_batch_by_default_as_the_authors_code():
    """llm-random computes capacity and the balancing loss over all of a batch's tokens: the experiment's
    MoE layers route the whole batch as one group (`routing_rows=None`); `routing=sequence` keeps rows apart."""
    config = preset_config("smoke")
    assert config.routing == "batch"
    moe = config.model_config("moe").moe.moe
    assert moe.routing_rows is None
    per_row = MoEMambaConfig(**{**vars(config), "routing": "sequence"}).model_config("moe").moe.moe
    assert per_row.routing_rows == 1 and per_row.replace(routing_rows=None) == moe
    with pytest.raises(ValueError, match="`routing`"):
        MoEMambaConfig(**{**vars(config), "routing": "row"})


def test_bpe_tokens_set_the_models_vocabulary():
    config = MoEMambaConfig(**{**vars(preset_config("smoke")), "tokenizer": "bpe", "bpe_vocab_size": 512})
    assert config.lm_config().tokenizer == "bpe" and config.model_config("moe").vocab_size == 512
    assert config.model_config("mamba").vocab_size == 512
    assert preset_config("smoke").model_config("moe").vocab_size == 259       # bytes + BOS, EOS, PAD
    with pytest.raises(ValueError, match="`tokenizer`"):
        MoEMambaConfig(**{**vars(preset_config("smoke")), "tokenizer": "chars"})


# ------------------------------------------------------------------------------- seeds and the ablation


def _arm(name, train, eval_, speedup=None, vs_e1=None, dropped=None):
    return dict(arm=name, params_total=10, params_active=5, final_train_loss=train, final_eval_loss=eval_,
                speedup=speedup, speedup_eval=None, speedup_vs_e1=vs_e1, dropped_fraction=dropped)


def test_across_seeds_means_and_sample_sd_and_keeps_not_reached_visible():
    by_seed = [[_arm("mamba", 2.0, 2.5), _arm("moe", 1.8, 2.4, speedup=1.5, dropped=0.1)],
               [_arm("mamba", 2.2, 2.9), _arm("moe", 1.9, 2.6, speedup=None, dropped=0.3)]]
    stats = run.across_seeds(by_seed)
    assert list(stats) == ["mamba", "moe"]
    assert stats["mamba"]["final_eval_loss_mean"] == pytest.approx(2.7)
    assert stats["mamba"]["final_eval_loss_sd"] == pytest.approx(math.sqrt(0.08))   # (0.2² + 0.2²) / (2 − 1)
    assert stats["moe"]["speedup_by_seed"] == [1.5, None]
    assert stats["moe"]["speedup_mean"] is None          # one seed did not reach: no mean hides it
    assert stats["moe"]["dropped_fraction_mean"] == pytest.approx(0.2)
    one = run.across_seeds(by_seed[:1])
    assert one["moe"]["speedup_mean"] == 1.5 and one["moe"]["speedup_sd"] == 0.0


def test_experts_ablation_takes_the_arms_that_differ_only_in_expert_count():
    config = MoEMambaConfig(**{**vars(preset_config("smoke")),
                               "arms": "mamba,moe_e16,moe_top2,moe,moe_e1,moe_cf2", "n_experts": 4})
    by_seed = [[_arm(a, 2.0, 2.0 + i / 10, vs_e1=1.0 + i) for i, a in enumerate(config.arm_names())]]
    rows = run.experts_ablation(config, by_seed)
    assert [(r["n_experts"], r["arm"]) for r in rows] == [(1, "moe_e1"), (4, "moe"), (16, "moe_e16")]
    assert [r["final_eval_loss_mean"] for r in rows] == pytest.approx([2.4, 2.3, 2.1])
    table = "\n".join(run.seeds_markdown({"by_seed": [{"seed": 0}], "across_seeds": run.across_seeds(by_seed),
                                          "experts_ablation": rows}))
    assert "| 16 | moe_e16 |" in table and "| 1 | moe_e1 |" in table and "1 (control)" in table
    assert "| 3.45 / 56% |" in table and "| 3.56 / >100% |" in table      # the paper's v1 row beside ours
    two = [[a for a in by_seed[0] if a["arm"] in ("mamba", "moe", "moe_top2")]]
    assert run.experts_ablation(config, two) == []          # one expert count is no ablation


def test_cpu_long_preset_is_the_papers_protocol_at_equal_active_parameters():
    import jax

    from mamba_jax.models import HybridLM, MambaLM, init_params
    from mamba_jax.models.moe_mamba import parameter_counts

    config = preset_config("cpu_long")
    assert config.arm_names() == ("mamba", "moe_e1", "moe_e4", "moe", "moe_e16", "moe_e32")
    assert (config.learning_rate, config.grad_clip_norm, config.routing, config.tokenizer, config.seeds) == \
        (1e-3, 0.5, "batch", "bpe", 2)
    assert config.lm_config().optimizer_config().grad_clip_norm == 0.5
    active = {}
    for arm in ("mamba", "moe"):
        model_config = config.model_config(arm)
        model = (MambaLM if arm == "mamba" else HybridLM)(model_config)
        shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), seq_len=8))
        active[arm] = parameter_counts(model_config, shapes)["active"]
    assert active["moe"] == active["mamba"], active        # d_expert 251 matches them exactly at 8 experts


def test_seeds_train_every_arm_per_seed_and_a_rerun_reads_the_finished_arms(tmp_path, monkeypatch):
    import mamba_jax.train

    monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path / "cache"))
    config = MoEMambaConfig(**{**vars(SMOKE), "arms": "moe", "seeds": 2, "num_steps": 4, "eval_every": 4})
    first = run.run(config, str(tmp_path / "run"))
    assert [b["seed"] for b in first["by_seed"]] == [0, 1]
    losses = [b["arms"][0]["final_eval_loss"] for b in first["by_seed"]]
    assert losses[0] != losses[1]                         # own init and batches per seed
    stats = first["across_seeds"]["moe"]
    assert stats["final_eval_loss_by_seed"] == losses
    assert stats["final_eval_loss_mean"] == pytest.approx(np.mean(losses))
    for seed in (0, 1):
        assert (tmp_path / "run" / f"seed_{seed}" / "arms" / "moe" / "summary.json").is_file()
    assert "Across seeds 0, 1" in (tmp_path / "run" / "results.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(mamba_jax.train, "train_loop", no_training)
    again = run.run(config, str(tmp_path / "run"))
    assert again["across_seeds"] == first["across_seeds"]
    changed = MoEMambaConfig(**{**vars(config), "learning_rate": 1e-2})
    with pytest.raises(AssertionError, match="trained again"):   # other settings: the arm is not reused
        run.run(changed, str(tmp_path / "run"))
