"""PKD: IDX parsing, the boosting weights and per-example loss against hand computations, and the `smoke`
preset end to end (`mamba-jax run pkd --preset smoke`), asserting on the results it writes."""
import gzip
import json
import math
import struct

import jax
import numpy as np
import pytest
from flax import serialization

from experiments.pkd.config import PKDConfig, preset_config
from experiments.pkd.run import boosting_weights, per_example_loss
from mamba_jax.cli import main as cli_main
from mamba_jax.data.images import (image_batches, load_digits, load_fashion_mnist, parse_benchmark_table, parse_idx,
                                   read_idx)
from mamba_jax.models.classifier import ClassifierConfig, MambaClassifier


# ----------------------------------------------------------------------------------------------- data


def _idx_bytes(code: int, shape, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", s) for s in shape) + payload


def test_idx_parser_reads_a_tiny_file(tmp_path):
    values = list(range(2 * 3 * 4))
    raw = _idx_bytes(0x08, (2, 3, 4), bytes(values))
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        arr = read_idx(str(tmp_path / name))
        assert arr.shape == (2, 3, 4) and arr.dtype == np.uint8
        assert arr[1, 2, 3] == 23 and arr[0, 1, 0] == 4
    # big-endian int32 labels
    ints = parse_idx(_idx_bytes(0x0C, (3,), struct.pack(">iii", 7, -2, 65536)))
    assert ints.tolist() == [7, -2, 65536]
    with pytest.raises(ValueError, match="not an IDX"):
        parse_idx(b"\x01\x00\x08\x01")
    with pytest.raises(ValueError, match="type code"):
        parse_idx(_idx_bytes(0x07, (1,), b"\x00"))
    with pytest.raises(ValueError, match="needs 24"):
        parse_idx(_idx_bytes(0x08, (2, 3, 4), bytes(values[:-1])))


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=str(tmp_path))


def test_benchmark_table_parser():
    text = ("intro\n| Classifier | Preprocessing | Fashion test accuracy | MNIST test accuracy | Submitter |\n"
            "| --- | --- | --- | --- | --- |\n| MLP | None | 0.8833 | - | a |\n| GRU | Norm | .897 | 0.988 | b |\n"
            "\nafter\n| x | y |\n")
    rows = parse_benchmark_table(text)
    assert rows == [dict(classifier="MLP", preprocessing="None", fashion_accuracy=0.8833, mnist_accuracy=None),
                    dict(classifier="GRU", preprocessing="Norm", fashion_accuracy=0.897, mnist_accuracy=0.988)]


def test_digits_split_and_batches():
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    assert x_tr.shape[1:] == (8, 8) and len(x_tr) + len(x_te) == 1797 and 0 <= x_tr.min() and x_tr.max() <= 1
    ds = image_batches(x_tr, y_tr, batch_size=100, seed=3)
    b0, b0_again = ds[0], image_batches(x_tr, y_tr, batch_size=100, seed=3)[0]
    np.testing.assert_array_equal(b0["index"], b0_again["index"])  # a pure function of the seed
    np.testing.assert_array_equal(b0["image"], x_tr[b0["index"]])
    np.testing.assert_array_equal(b0["label"], y_tr[b0["index"]])
    # one epoch covers every example exactly once (batches 0..13 of 100 from 1438 examples)
    seen = np.concatenate([ds[i]["index"] for i in range(len(y_tr) // 100)])
    assert len(set(seen.tolist())) == len(seen)


# ------------------------------------------------------------------------------------- loss, weights


def test_boosting_weights_hand_computed():
    losses = np.array([0.0, math.log(2), math.log(4)])
    # exp(ℓ) = 1, 2, 4 → normalised to mean 1: 3/7, 6/7, 12/7
    np.testing.assert_allclose(boosting_weights(losses, 1.0), [3 / 7, 6 / 7, 12 / 7], rtol=1e-12)
    # β = 0.5: exp(ℓ/2) = 1, √2, 2
    s = 1 + math.sqrt(2) + 2
    np.testing.assert_allclose(boosting_weights(losses, 0.5), [3 / s, 3 * math.sqrt(2) / s, 6 / s], rtol=1e-12)
    # clipped at 1.5: (3/7, 6/7, 3/2) renormalised to mean 1 → ×14/13 → 6/13, 12/13, 21/13
    np.testing.assert_allclose(boosting_weights(losses, 1.0, max_weight=1.5), [6 / 13, 12 / 13, 21 / 13], rtol=1e-12)
    np.testing.assert_allclose(boosting_weights(losses, 0.0), [1, 1, 1], rtol=1e-12)
    # huge losses do not overflow
    w = boosting_weights(np.array([1000.0, 1001.0]), 1.0)
    np.testing.assert_allclose(w, [2 / (1 + math.e), 2 * math.e / (1 + math.e)], rtol=1e-12)
    with pytest.raises(ValueError, match="losses"):
        boosting_weights(np.zeros((2, 2)), 1.0)


def test_per_example_loss_against_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 5)).astype(np.float32)
    t = 3 * rng.normal(size=(4, 5)).astype(np.float32)
    y = np.array([0, 3, 4, 1])

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ce = -log_softmax(s)[np.arange(4), y]
    T = 2.0
    lp, lq = log_softmax(t / T), log_softmax(s / T)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(per_example_loss(s, y, None, alpha=0.3, temperature=T), ce, rtol=1e-5)
    np.testing.assert_allclose(per_example_loss(s, y, t, alpha=1.0, temperature=T), ce, rtol=1e-5)
    np.testing.assert_allclose(per_example_loss(s, y, t, alpha=0.3, temperature=T), 0.3 * ce + 0.7 * T * T * kl,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------ the smoke run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pkd") / "run"
    assert cli_main(["run", "pkd", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_results(smoke_run):
    out = smoke_run
    for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "accuracy_vs_flops.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    config = PKDConfig(**results["config"])
    K = len(config.student_widths())
    ens = results["ensemble"]
    assert [e["m"] for e in ens] == list(range(1, K + 1))
    accs = [results["teacher"]["accuracy"], results["direct"]["accuracy"], results["labels"]["accuracy"]]
    accs += [e["accuracy"] for e in ens] + [s["accuracy"] for s in results["students"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert results["teacher"]["accuracy"] > 0.5          # 10 classes: chance is 0.1
    # cumulative FLOPs: strictly increasing, the running sum of the students' own counts
    cum = [e["cumulative_flops"] for e in ens]
    assert all(b > a for a, b in zip(cum, cum[1:]))
    np.testing.assert_allclose(cum, np.cumsum([s["stats"]["flops"] for s in results["students"]]), rtol=1e-9)
    assert cum[-1] < results["teacher"]["stats"]["flops"]
    from mamba_jax.models.classifier import classifier_flops
    assert results["teacher"]["stats"]["flops_analytic"] == classifier_flops(config.teacher_config())
    assert results["ensemble_stats"]["flops_analytic"] == sum(classifier_flops(c) for c in config.student_configs())
    # the single students were sized to the ensemble's analytic FLOPs; with direct_per_budget, one direct KD
    # student per prefix m, sized to the first m students' analytic FLOPs, the last being "direct"
    cum_analytic = np.cumsum([classifier_flops(c) for c in config.student_configs()])
    assert [e["cumulative_flops_analytic"] for e in ens] == cum_analytic.tolist()
    assert results["direct"]["stats"]["flops_analytic"] == results["labels"]["stats"]["flops_analytic"]
    by_budget = results["direct_by_budget"]
    assert config.direct_per_budget and [d["m"] for d in by_budget] == list(range(1, K + 1))
    for d, budget in zip(by_budget, cum_analytic):
        assert d["budget_analytic"] == budget and abs(d["flops_analytic"] / budget - 1) < 0.25
        # the closest width: one narrower or wider is further from the budget
        for other in (d["d_model"] - 1, d["d_model"] + 1):
            if other >= 1:
                assert abs(classifier_flops(config.single_config(other)) - budget) >= abs(d["flops_analytic"] - budget)
    assert by_budget[-1]["d_model"] == results["direct"]["d_model"]
    assert by_budget[-1]["accuracy"] == results["direct"]["accuracy"]
    for stats in [results["teacher"]["stats"], results["ensemble_stats"], results["direct"]["stats"]]:
        assert stats["params"] > 0 and stats["latency_ms_b1"] > 0 and stats["latency_ms_b256"] > 0
        assert stats["memory_bytes_b256"] > stats["memory_bytes_b1"] > 0
    # the main ensemble is additive (no boosting weights); the mean-of-softmaxes one boosts before 2..K
    assert results["ensemble_rule"] == "additive" and results["boosting"] == []
    boosting = results["ensembles"]["mean_softmax"]["boosting"]
    assert len(boosting) == K - 1
    assert all(b["max_weight"] >= 1.0 and 0 < b["effective_fraction"] <= 1.0 for b in boosting)
    assert results["ensembles"]["additive"]["curve"] == ens
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"teacher", "labels"} | {f"direct_budget_{m}" for m in range(1, K + 1)} | {
        f"{rule}_student_{i + 1}" for rule in ("additive", "mean_softmax") for i in range(K)}
    table = (out / "results.md").read_text()
    assert "paper" in table and "MNIST" in table and "Anytime ensemble" in table


@pytest.mark.parametrize("rule", ["additive", "mean_softmax"])
def test_saved_students_reproduce_the_ensemble_accuracy(smoke_run, rule):
    """Each ensemble's accuracy after m students, recomputed here from the saved students: the additive
    ensemble predicts with the sum of its students' logits, the other with the mean of their softmaxes."""
    results = json.loads((smoke_run / "results.json").read_text())
    x, y = load_digits("test")
    logits = []
    for i, student in enumerate(results["ensembles"][rule]["students"]):
        name = f"{rule}_student_{i + 1}"
        cfg = ClassifierConfig(**json.loads((smoke_run / "models" / f"{name}.json").read_text()))
        params = serialization.msgpack_restore((smoke_run / "models" / f"{name}.msgpack").read_bytes())
        logits.append(np.asarray(MambaClassifier(cfg).apply({"params": params}, x), np.float64))
        assert abs(np.mean(logits[-1].argmax(-1) == y) - student["accuracy"]) < 1e-9
        if rule == "additive":
            pred = np.sum(logits, axis=0)
            assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == results["students"][i]["stats"]["params"]
        else:
            p = [np.exp(z - z.max(-1, keepdims=True)) for z in logits]
            pred = np.mean([q / q.sum(-1, keepdims=True) for q in p], axis=0)
        assert abs(np.mean(pred.argmax(-1) == y) - results["ensembles"][rule]["curve"][i]["accuracy"]) < 1e-9


def test_an_additive_student_trains_on_the_sum_with_the_frozen_ensemble():
    """The loss of student m is that of F_{m-1} + f_m: on a frozen ensemble already certain of every label
    (and a teacher that agrees) the new student's loss is near 0, alone (base 0) it is about log 10; the
    frozen logits are an input, never changed by training."""
    from experiments.pkd.run import train_model

    config = preset_config("smoke")
    cfg = config.student_configs()[0]
    x, y = load_digits("train")
    x, y = x[:64], y[:64]
    certain = 20.0 * np.eye(10, dtype=np.float32)[y]
    frozen = certain.copy()
    losses = {}
    for label, base in (("alone", None), ("on the ensemble", frozen)):
        records = []
        train_model(label, cfg, config, (x, y), steps=2, seed=config.seed + 1, teacher_logits=certain,
                    base_logits=base, records=records)
        losses[label] = records[-1]["loss"]
    np.testing.assert_array_equal(frozen, certain)
    assert losses["on the ensemble"] < 0.05 < 1.0 < losses["alone"], losses


@pytest.mark.parametrize("override,pattern", [
    (dict(dataset="cifar"), "`dataset`"),
    (dict(student_d_models="8,x"), "`student_d_models`"),
    (dict(alpha=1.5), "`alpha`"),
    (dict(teacher_steps=0), "`teacher_steps`"),
    (dict(patch_size=3), "`patch_size`"),
    (dict(boost_max_weight=0.5), "`boost_max_weight`"),
    (dict(ensembles="additive,bagging"), "`ensembles`"),
])
def test_bad_config_is_named(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        PKDConfig(**{**vars(preset_config("smoke")), **override})


def test_bad_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "pkd", "--preset", "smoke", "teacher_stepz=3"])
    assert "teacher_steps" in capsys.readouterr().err


def test_presets():
    assert preset_config("cpu") == PKDConfig()
    assert preset_config("smoke").dataset == "digits"
    long = preset_config("cpu_long")
    assert (long.dataset, long.seeds, long.direct_per_budget, len(long.student_widths())) == ("mnist", 2, True, 7)
    paper = preset_config("paper")
    assert len(paper.student_widths()) == 7 and paper.patch_size == 4


def test_analytic_flops_of_a_tiny_classifier_by_hand():
    """8×8 images as 8 row tokens of 8 values, d_model 4 (d_inner 8, dt_rank 1), d_state 2, d_conv 4, one
    layer, 10 classes. Multiply-adds per token in the mixer: in_proj 4·16 = 64, conv 4·8 = 32, x_proj
    8·(1 + 4) = 40, dt_proj 1·8 = 8, out_proj 8·4 = 32 → 176, i.e. 352 FLOPs, plus the scan's 6 per channel
    and state: 6·8·2 = 96 → 448 per token, 3,584 for 8 tokens. Embedding 2·8·4·8 = 512, head 2·4·10 = 80:
    4,176. Bidirectional: a second mixer per layer, +3,584."""
    from mamba_jax.models.classifier import classifier_flops

    cfg = ClassifierConfig(n_classes=10, image_height=8, image_width=8, d_model=4, n_layer=1, d_state=2, d_conv=4)
    assert classifier_flops(cfg) == 4176
    assert classifier_flops(cfg.replace(bidirectional=True)) == 4176 + 3584
    assert classifier_flops(cfg.replace(n_layer=3)) == 512 + 3 * 3584 + 80


def test_frozen_students_are_bitwise_unchanged_while_the_next_trains(tmp_path, monkeypatch):
    """Additive ensemble: what student m trains on top of is exactly (bitwise) the sum of the logits of the
    saved students 1..m−1, and each student's params when it finished equal the saved ones and those the
    ensemble keeps after every later student trained."""
    from experiments.pkd import run as pkd_run

    config = preset_config("smoke")          # the smoke run's settings: its compiled train step is reused
    x, y = load_digits("train")
    x, y = x[:96], y[:96]
    teacher = np.random.default_rng(0).normal(size=(len(y), 10)).astype(np.float32)
    seen = []
    original = pkd_run.train_model

    def recording(name, *args, base_logits=None, **kwargs):
        params = original(name, *args, base_logits=base_logits, **kwargs)
        seen.append((name, None if base_logits is None else base_logits.copy(),
                     jax.tree_util.tree_map(np.array, params)))
        return params

    monkeypatch.setattr(pkd_run, "train_model", recording)
    students, curve, _ = pkd_run.train_ensemble("additive", config, (x, y), (x[:32], y[:32]), teacher, str(tmp_path))
    assert [name for name, _, _ in seen] == ["additive_student_1", "additive_student_2", "additive_student_3"]
    assert seen[0][1] is None
    logits = []
    for m, ((name, base, at_finish), student) in enumerate(zip(seen, students)):
        saved = serialization.from_bytes(at_finish, (tmp_path / "models" / f"{name}.msgpack").read_bytes())
        for a, b, c in zip(jax.tree_util.tree_leaves(at_finish), jax.tree_util.tree_leaves(saved),
                           jax.tree_util.tree_leaves(student["params"])):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, np.asarray(c))
        if m:
            np.testing.assert_array_equal(base, sum(logits))
        logits.append(pkd_run.predict_probs(student["config"], saved, x, config.eval_batch_size, logits=True))


def test_across_seeds_means_each_point_and_plots(smoke_run, tmp_path):
    from experiments.pkd.run import across_seeds, plot_accuracy_vs_flops, seeds_markdown

    first = json.loads((smoke_run / "results.json").read_text())
    second = json.loads(json.dumps(first))
    second["config"]["seed"] = 1
    for entry in second["ensembles"]["additive"]["curve"] + second["direct_by_budget"] + [second["labels"],
                                                                                          second["teacher"]]:
        entry["accuracy"] = entry["accuracy"] - 0.1
    summary = across_seeds([first, second])
    assert summary["seeds"] == [0, 1]
    tf = first["teacher"]["stats"]["flops_analytic"]
    for got, a in zip(summary["ensembles"]["additive"], first["ensembles"]["additive"]["curve"]):
        assert got["accuracy"] == pytest.approx([a["accuracy"], a["accuracy"] - 0.1])
        assert got["flops_fraction"] == a["cumulative_flops_analytic"] / tf
    assert summary["ensembles"]["mean_softmax"][0]["accuracy"] == [first["ensembles"]["mean_softmax"]["curve"][0]["accuracy"]] * 2
    assert summary["labels"]["flops_fraction"] == pytest.approx(first["labels"]["stats"]["flops_analytic"] / tf)
    table = seeds_markdown(summary)
    m1 = first["ensembles"]["additive"]["curve"][0]["accuracy"]
    assert f"{m1 - 0.05:.4f} ± {0.1 / math.sqrt(2):.4f}" in table and "seeds 0, 1" in table
    plot_accuracy_vs_flops(summary, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
