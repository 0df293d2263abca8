"""`mamba-jax run icl --preset smoke` end to end: it writes every output and the numbers in them hold."""
import json

import numpy as np
import pytest

from experiments.icl.config import ICLConfig, preset_config
from experiments.icl.run import eval_prompts
from experiments.icl.train import model_errors
from mamba_jax.cli import main as cli_main
from mamba_jax.interop import load_pretrained


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["run", "icl", "--preset", "smoke", "--out", str(out), "models=mamba,transformer,hybrid",
                     "hybrid_pattern=M A", "seeds=2"]) == 0
    for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "errors.png", "probes.png",
                 "training_loss.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    config = ICLConfig(**results["config"])
    errors = {k: np.asarray(v) for k, v in results["errors"].items()}
    assert set(errors) == {"mamba", "transformer", "hybrid", "least_squares", "averaging", "3-nn"}
    assert all(e.shape == (config.eval_points,) and np.isfinite(e).all() for e in errors.values())
    # closed forms on noiseless linear regression: least squares is exact once it has d examples;
    # averaging's error at i examples is (d + 1) / i in expectation
    assert errors["least_squares"][config.d:].max() < 1e-6
    assert errors["least_squares"][:config.d].min() > 1e-3
    expected_avg = np.array([(config.d + 1) / i for i in range(1, config.eval_points)])
    assert np.abs(errors["averaging"][1:] - expected_avg).mean() < 0.5 * expected_avg.mean()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["model"], r["seed"]) for r in records} == {(m, s) for m in ("mamba", "transformer", "hybrid")
                                                          for s in (0, 1)}
    assert records[-1]["step"] == config.num_steps and records[-1]["points"] == config.points_end
    # two seeds per arm: each saved model reproduces its own curve; the table's value is their mean ± sd
    assert results["seeds"] == [0, 1]
    xs, ys = eval_prompts(config)
    curves = []
    for k, seed in enumerate((0, 1)):
        model, params = load_pretrained(out / "models" / "mamba" / f"seed_{seed}")
        curves.append(model_errors(model, params, xs, ys, config.task, config.d))
        np.testing.assert_allclose(curves[-1], results["errors_by_seed"][k]["mamba"], rtol=1e-5)
    assert not np.allclose(curves[0], curves[1])
    np.testing.assert_allclose(errors["mamba"], np.mean(curves, 0), rtol=1e-5)
    np.testing.assert_allclose(results["errors_spread"]["mamba"], np.std(curves, 0), rtol=1e-4, atol=1e-7)
    losses = [[r["loss"] for r in records if r["model"] == "mamba" and r["seed"] == s][-1] for s in (0, 1)]
    assert results["final_train_loss_by_seed"]["mamba"] == losses
    # the headline table: error above least squares at d and 2d examples (2 x the trained length is past
    # eval_points here)
    for i in (config.d, 2 * config.d):
        assert results["error_above_least_squares"]["mamba"][str(i)] == pytest.approx(
            errors["mamba"][i] - errors["least_squares"][i])
    printed = capsys.readouterr().out
    assert "| model / baseline |" in printed and "Probes at" in printed and "Error above least squares" in printed
    assert f"{errors['mamba'][1]:.3g} ± {results['errors_spread']['mamba'][1]:.2g}" in printed
    # Garg et al.'s suite (÷ d): least squares is exact from d examples where the closed form says so, the
    # orthogonal queries stop at d, and every model has a finite error at every queried position
    ood = results["garg_ood"]
    assert {"standard", "random_quadrants", "orthogonal_train_test", "overlapping_train_test", "half_subspace",
            "skewed", "noisy_linear_regression", "scale_x=2", "scale_y=0.5"} <= set(ood)
    for setting in ("standard", "random_quadrants", "overlapping_train_test", "half_subspace", "skewed",
                    "scale_x=2", "scale_y=0.5"):
        assert max(ood[setting]["least_squares"][config.d:]) < 1e-6, setting
    assert ood["orthogonal_train_test"]["mamba"][config.d:] == [None] * (config.eval_points - config.d)
    assert all(np.isfinite(v) for e in ood["standard"].values() for v in e)
    # probes: one row per residual stream (read-in + each layer); gradient descent from w = 0 starts at
    # the error of predicting 0, which is mean(y²)/d on the evaluation prompts, recomputed here
    probes = results["probes"]
    depths = {"mamba": config.mamba_layers, "transformer": config.transformer_layers, "hybrid": 2}
    for name, rows in probes["layers"].items():
        rows = np.asarray(rows)
        assert rows.shape == (depths[name] + 1, config.eval_points) and np.isfinite(rows).all(), name
    gd = np.asarray(probes["gradient_descent"]["errors"])
    _, ys = eval_prompts(config)
    np.testing.assert_allclose(gd[0], np.mean(np.asarray(ys, np.float64) ** 2, axis=0) / config.d, rtol=1e-6)
    late = slice(config.d + 1, None)
    assert gd[-1][late].mean() < gd[1][late].mean() < gd[0][late].mean()


@pytest.mark.parametrize("override,pattern", [
    (dict(models="mamba,gpt"), "`models`"),
    (dict(eval_points=3), "`eval_points`"),
    (dict(task="nope"), "`task`"),
    (dict(d=0), "`d`"),
    (dict(ood_scales="2,-1"), "`ood_scales`"),
    (dict(ood_scales="big"), "`ood_scales`"),
])
def test_bad_config_is_named(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        ICLConfig(**{**vars(preset_config("smoke")), **override})


def test_bad_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "icl", "--preset", "smoke", "num_stepz=3"])
    assert "num_steps" in capsys.readouterr().err


def test_make_demo_runs_the_cpu_preset_whose_values_are_the_defaults():
    import pathlib
    makefile = (pathlib.Path(__file__).resolve().parents[2] / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "mamba-jax run icl --preset cpu" in demo
    config = preset_config("cpu")
    assert config == ICLConfig()
    # the demo compares Mamba with a Transformer on linear regression, against least squares
    assert config.task == "linear_regression" and config.model_names() == ("mamba", "transformer")


def test_paper_sizes():
    from experiments.icl.config import MODEL_SIZES
    paper = preset_config("paper")
    assert (paper.d, paper.d_model, paper.mamba_layers, paper.transformer_layers, paper.n_heads) == (20, 256, 24, 12, 8)
    small = preset_config("paper", size="small")
    assert (small.d_model, small.mamba_layers, small.transformer_layers, small.n_heads) == (128, 12, 6, 4)
    tiny = preset_config("cpu", size="tiny")
    assert (tiny.d_model, tiny.mamba_layers, tiny.transformer_layers, tiny.n_heads) == (64, 6, 3, 2)
    assert set(MODEL_SIZES) == {"standard", "small", "tiny"}
    relu = preset_config("paper", task="relu_2nn")
    assert (relu.points_start, relu.points_end, relu.points_increment) == (26, 101, 5)
    with pytest.raises(ValueError, match="`size`"):
        preset_config("cpu", size="huge")


def test_the_papers_transformer_arms_differ_only_in_their_positions():
    """transformer_garg learns absolute positions (Garg et al.'s GPT-2); transformer_grazzi has none (Grazzi
    et al. zero and freeze them): the same weights otherwise, and only Garg's arm reads a position table."""
    import jax

    from mamba_jax.data.function_classes import sample_prompts
    from mamba_jax.pytree import path_names

    config = ICLConfig(models="transformer_garg,transformer_grazzi", d_model=16, transformer_layers=1)
    models = config.build_models()
    garg, grazzi = models["transformer_garg"], models["transformer_grazzi"]
    assert garg.config.position_embedding == "learned" and grazzi.config.position_embedding == "none"
    assert garg.config.replace(position_embedding="none") == grazzi.config
    xs, ys = sample_prompts(jax.random.PRNGKey(0), "linear_regression", 2, 5, config.d)
    pg = garg.init(jax.random.PRNGKey(1), xs, ys)["params"]
    pz = grazzi.init(jax.random.PRNGKey(1), xs, ys)["params"]
    name = lambda path: "/".join(path_names(path))                                              # noqa: E731
    names = lambda p: {name(path) for path, _ in jax.tree_util.tree_leaves_with_path(p)}       # noqa: E731
    extra = names(pg) - names(pz)
    assert extra and all("position" in n for n in extra), extra
    assert not names(pz) - names(pg)
    # Garg's arm depends on its position table; Grazzi's output is what Garg's gives with a zero table
    zeroed = jax.tree_util.tree_map_with_path(lambda path, x: x * 0 if "position" in name(path) else x, pg)
    np.testing.assert_allclose(grazzi.apply({"params": {k: v for k, v in zeroed.items() if k in pz}}, xs, ys),
                               garg.apply({"params": zeroed}, xs, ys), rtol=1e-5, atol=1e-6)
    assert not np.allclose(garg.apply({"params": pg}, xs, ys), garg.apply({"params": zeroed}, xs, ys))


def test_cpu_long_preset_is_the_issues_protocol():
    """d = 8 with dims 3 → 8 and points 9 → 17 in 500-step stages (full size at step 2500), Mamba beside both
    papers' Transformers, 3 seeds, evaluated to twice the trained length."""
    config = preset_config("cpu_long")
    assert (config.d, config.d_start, config.points_start, config.points_end) == (8, 3, 9, 17)
    assert config.full_size_step() == 2500 and config.num_steps > 2 * config.full_size_step()
    assert config.model_names() == ("mamba", "transformer_garg", "transformer_grazzi") and config.seeds == 3
    assert config.eval_points > 2 * config.points_end - 1 and config.lr_schedule == "cosine"
    # the demo: dims 2 → 4 (2 stages), points 5 → 11 by 2 (3 stages) of 250 steps
    assert preset_config("cpu").full_size_step() == 750


def test_least_squares_loss_floor_by_hand():
    """d = 8, 17 points: errors 8, 7, ..., 1 with 0..7 examples, 0 after: 36 / 17. d = 4, 11 points: 10 / 11."""
    from experiments.icl.run import least_squares_loss_floor

    assert least_squares_loss_floor(8, 17) == pytest.approx(36 / 17)
    assert least_squares_loss_floor(4, 11) == pytest.approx(10 / 11)
    # the same from the least-squares baseline on sampled prompts (its per-position error × d, averaged)
    from experiments.icl.baselines import least_squares
    from mamba_jax.data.function_classes import sample_prompts
    import jax

    xs, ys = sample_prompts(jax.random.PRNGKey(0), "linear_regression", 4000, 11, 4)
    mse = np.mean((least_squares(np.asarray(xs, np.float64), np.asarray(ys, np.float64)) - np.asarray(ys)) ** 2)
    assert mse == pytest.approx(10 / 11, rel=0.05)
