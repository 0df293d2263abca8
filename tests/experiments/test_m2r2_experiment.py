"""`mamba-jax run m2r2 --preset smoke` end to end: the results it writes are consistent with themselves and
with what the mechanisms guarantee (greedy self-speculative tokens equal plain decoding's, the base frozen,
the no-exit point is the full model, the all-layers skip schedule is the full model)."""
import json
import os

import numpy as np
import pytest

from experiments.m2r2.config import M2R2Config, preset_config
from experiments.m2r2.run import claims_of, pool_prompt_timings, quality_at
from mamba_jax.cli import main as cli_main


def test_smoke_run_writes_results(tmp_path):
    out = str(tmp_path / "m2r2")
    assert cli_main(["run", "m2r2", "--preset", "smoke", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    c = preset_config("smoke")
    assert r["fast"]["base_unchanged"] is True
    assert r["config"]["shared_kv"] is True and any("KV cache is shared" in d for d in r["deviations"])
    # adapters only: per fast layer an RMSNorm (d) and a d×r, r×d pair
    assert r["fast"]["adapter_params"] == c.n_fast * (c.d_model + 2 * c.d_model * c.adapter_rank)
    e = r["early_exit"]
    assert set(e["sweeps"]) == {"M2R2 (fast stream, confidence)", "slow stream, confidence (no adapters)",
                                "slow stream, distance-based", "skip decoding (SkipDecode schedule)"}
    for name, points in e["sweeps"].items():
        assert len(points) >= 2, name
        for p in points:
            assert 1.0 <= p["mean_layers"] <= c.n_layer and 0.0 <= p["agreement"] <= 1.0, (name, p)
    for name in ("M2R2 (fast stream, confidence)", "slow stream, distance-based"):
        never = [p for p in e["sweeps"][name] if p["threshold"] == float("inf")]
        assert len(never) == 1 and never[0]["mean_layers"] == c.n_layer and never[0]["agreement"] == 1.0
        assert never[0]["nll"] == pytest.approx(e["full_model_nll"], rel=1e-5)
    skip_all = [p for p in e["sweeps"]["skip decoding (SkipDecode schedule)"] if p["min_layers"] == c.n_layer]
    assert skip_all[0]["agreement"] == 1.0 and skip_all[0]["nll"] == pytest.approx(e["full_model_nll"], rel=1e-5)
    greedy = r["speculative"]["T=0"]
    assert set(greedy) == {"plain decoding", "M2R2 self-speculative (fast stream)",
                           "LayerSkip-style (first layers, no adapters)", "two-model (small Transformer draft)"}
    for name, d in greedy.items():
        assert d["tokens_per_s"] > 0
        if name != "plain decoding":
            assert d["same_tokens"] is True and 1.0 <= d["tau"] <= c.num_draft + 1 and d["target_calls"] >= 1
            assert len(d["tau_per_prompt"]) == c.n_prompts == 2
            assert min(d["tau_per_prompt"]) <= d["tau"] <= max(d["tau_per_prompt"])
    m = r["experts"]["models"]["A E"]
    assert set(m["hit_rate"]["slow"]) == {"1", "2", "3"} and set(m["hit_rate"]["fast"]) == {"1", "2"}
    assert all(0.0 <= v <= 1.0 for s in m["hit_rate"].values() for v in s.values())
    assert m["offloaded_decode"]["max_abs_logit_difference"] == 0.0 and m["offloaded_decode"]["expert_bytes"] > 0
    for chip in r["experts"]["cost_model"]["chips"].values():
        assert chip["on_demand_ms"] > chip["all_in_hbm_ms"] > 0
    for name in ("results.md", "quality_vs_layers.png", "speculative.png", "expert_hit_rate.png", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    minutes = r["stage_minutes"]
    assert list(minutes) == ["base", "fast", "draft", "early exit", "speculative", "experts"]
    assert all(v > 0 for v in minutes.values()) and r["elapsed_min"] == pytest.approx(sum(minutes.values()))


def test_quality_at_reads_the_upper_envelope_and_claims_compare_at_equal_layers():
    pts = [dict(mean_layers=2.0, agreement=0.5), dict(mean_layers=4.0, agreement=0.9),
           dict(mean_layers=3.0, agreement=0.4)]               # dominated: the envelope at 3 is 0.7
    assert quality_at(pts, 1.5) is None
    assert quality_at(pts, 3.0) == pytest.approx(0.7)
    assert quality_at(pts, 5.0) == pytest.approx(0.9)
    early = {"agreement_at_layers": {"M2R2 (fast stream, confidence)": {"2": 0.6, "3": 0.8},
                                     "slow stream, distance-based": {"2": 0.5, "3": 0.8}}}
    nll_pts = [dict(mean_layers=2.0, nll=3.0), dict(mean_layers=4.0, nll=2.0), dict(mean_layers=3.0, nll=3.5)]
    assert quality_at(nll_pts, 3.0, "nll") == pytest.approx(2.5)           # lower is better: 3.5 is dominated
    spec = {"T=0": {"M2R2 self-speculative (fast stream)": {"speedup": 2.1, "tau": 3.0},
                    "LayerSkip-style (first layers, no adapters)": {"speedup": 1.5, "tau": 2.0}}}
    early["nll_at_layers"] = {"M2R2 (fast stream, confidence)": {"2": 3.0, "3": 2.9},
                              "slow stream, distance-based": {"2": 3.1, "3": 2.95}}
    # tie in agreement at 3 layers: not above; NLL lower at both budgets; ≥ 2x; τ above LayerSkip-style
    assert [x["holds"] for x in claims_of(early, spec)] == [False, True, True, True]


def test_prompts_pool_into_all_tokens_over_all_seconds_and_call_weighted_tau():
    """Two prompts by hand: 128 tokens each; plain 2 s + 1 s; the draft 4 s (10 calls, τ 2, acceptance 0.25)
    + 1 s (30 calls, τ 4, acceptance 0.75) -> 256 / 3 and 256 / 5 tokens/s, τ (2·10 + 4·30) / 40 = 3.5 (an
    unweighted mean would say 3), acceptance 0.625; greedy tokens equal only where every prompt's are."""
    def timing(plain_s, seconds, calls, tau, acceptance, same):
        return dict(plain=dict(tokens_per_s=128 / plain_s, seconds=plain_s), drafts={"d": dict(
            tokens_per_s=128 / seconds, seconds=seconds, speedup=plain_s / seconds, target_calls=calls, tau=tau,
            acceptance_rate=acceptance, same_tokens=same)})

    pooled = pool_prompt_timings([timing(2.0, 4.0, 10, 2.0, 0.25, True), timing(1.0, 1.0, 30, 4.0, 0.75, True)])
    assert pooled["plain"]["tokens_per_s"] == pytest.approx(256 / 3)
    d = pooled["drafts"]["d"]
    assert d["tokens_per_s"] == pytest.approx(256 / 5) and d["speedup"] == pytest.approx(3 / 5)
    assert d["target_calls"] == 40 and d["tau"] == pytest.approx(3.5) and d["acceptance_rate"] == pytest.approx(0.625)
    assert d["same_tokens"] is True and d["tau_per_prompt"] == [2.0, 4.0]
    assert pool_prompt_timings([timing(2.0, 4.0, 10, 2.0, 0.25, True),
                                timing(1.0, 1.0, 30, 4.0, 0.75, False)])["drafts"]["d"]["same_tokens"] is False
    assert pool_prompt_timings([timing(2.0, 4.0, 10, 2.0, 0.25, None)])["drafts"]["d"]["same_tokens"] is None


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="n_fast"):
        M2R2Config(n_fast=8, n_layer=8)
    with pytest.raises(ValueError, match="moe_patterns"):
        M2R2Config(moe_patterns="A M")
    with pytest.raises(ValueError, match="temperatures"):
        M2R2Config(temperatures="hot")
    with pytest.raises(ValueError, match="prompt_len"):
        M2R2Config(prompt_len=128, seq_len=128)


def test_the_teacher_of_an_m1_run_as_the_base(tmp_path):
    """`m1_run=<folder>`: the teacher is restored from the m1 run's checkpoint (read only) and the run uses
    M1's arithmetic task; greedy self-speculative tokens still equal plain decoding's."""
    import jax

    from experiments.m1.config import preset_config as m1_preset
    from experiments.m1.run import _optimizer as m1_optimizer, teacher_model
    from experiments.m2r2.run import load_m1_teacher
    from mamba_jax.models import init_params
    from mamba_jax.train import Checkpointer, create_train_state
    from tests.invariants.families import trained_scale

    m1 = m1_preset("smoke")
    folder = tmp_path / "m1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(m1.to_dict()))
    teacher = teacher_model(m1)
    params = trained_scale(init_params(teacher, jax.random.PRNGKey(0)), seed=5)
    checkpoints = Checkpointer(str(folder / "teacher" / "checkpoints"), max_to_keep=1)
    checkpoints.save(m1.teacher_steps, create_train_state(teacher.apply, params, m1_optimizer(
        m1, m1.teacher_lr, m1.teacher_steps)), {"step": m1.teacher_steps})
    checkpoints.close()
    _, restored, _ = load_m1_teacher(str(folder))
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    with pytest.raises(ValueError, match="config.json"):
        load_m1_teacher(str(tmp_path))

    out = str(tmp_path / "m2r2")
    overrides = [f"m1_run={folder}", "n_fast=1", "adapter_steps=4", "draft_steps=4", "moe_patterns=",
                 "exit_thresholds=3"]
    assert cli_main(["run", "m2r2", "--preset", "smoke", "--out", out, *overrides]) == 0
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert "m1 run" in r["base"]["description"] and r["base"]["n_layer"] == m1.n_layer
    assert r["fast"]["base_unchanged"] is True
    assert r["config"]["shared_kv"] is True and any("KV cache is shared" in d for d in r["deviations"])
    drafts = {name: d for name, d in r["speculative"]["T=0"].items() if name != "plain decoding"}
    assert all(d["same_tokens"] is True and len(d["tau_per_prompt"]) == 2 for d in drafts.values())
    assert r["experts"] is None and not os.path.exists(os.path.join(out, "expert_hit_rate.png"))


def test_an_hf_llama_checkpoint_as_the_base(tmp_path):
    """`base=<folder>` (the `paper` preset's base): a Llama checkpoint in the HF layout with its tokenizer.json,
    used as is (`base_steps=0`): the run takes its shape and tokenizer, counts its parameters as the
    safetensors file holds them, and leaves it bitwise unchanged; greedy self-speculation equals plain
    decoding."""
    import jax
    from safetensors.numpy import load_file

    from mamba_jax.data import read_documents, text_files, train_bpe_tokenizer
    from mamba_jax.interop import save_hf
    from mamba_jax.models import TransformerConfig, TransformerLM, init_params
    from tests.invariants.families import trained_scale

    bpe = train_bpe_tokenizer(read_documents(text_files(max_files=20)), vocab_size=320)
    model = TransformerLM(TransformerConfig(vocab_size=bpe.vocab_size, d_model=32, n_layer=3, n_heads=2,
                                            n_kv_heads=1, d_intermediate=48))
    folder = tmp_path / "llama"
    save_hf(model, trained_scale(init_params(model, jax.random.PRNGKey(0)), seed=3), str(folder))
    bpe.save(str(folder))
    raw = json.loads((folder / "config.json").read_text())
    raw.update(bos_token_id=bpe.bos_id, eos_token_id=[bpe.eos_id])
    (folder / "config.json").write_text(json.dumps(raw))
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(load_file(str(folder / name)))

    out = str(tmp_path / "m2r2")
    overrides = [f"base={folder}", "base_steps=0", "n_fast=1", "adapter_steps=4", "draft_steps=4",
                 "moe_patterns=", "exit_thresholds=3"]
    assert cli_main(["run", "m2r2", "--preset", "smoke", "--out", out, *overrides]) == 0
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert r["base"]["description"] == f"{folder} (3 layers, d 32)" and r["base"]["n_layer"] == 3
    assert r["base"]["params"] == sum(t.size for t in tensors.values())
    assert r["fast"]["base_unchanged"] is True
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))     # the checkpoint's own, no BPE trained
    assert not os.path.exists(os.path.join(out, "base"))               # base_steps=0: no training stage ran
    drafts = {name: d for name, d in r["speculative"]["T=0"].items() if name != "plain decoding"}
    assert all(d["same_tokens"] is True and len(d["tau_per_prompt"]) == 2 for d in drafts.values())
