import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset

from loopalign import OuroForCausalLM
from loopalign.eval import (
    CompareConfig,
    FeatureConfig,
    GapConfig,
    GapResult,
    ReadoutConfig,
    TaskConfig,
    compare,
    evaluate_gap,
    extract_features,
    load_probes,
    prepare_records,
    verdict_token_ids,
)
from loopalign.eval.features import reused_features
from loopalign.eval.task import integer_verifier


def test_features_of_loop_t_match_a_t_loop_forward(tiny_model, synthetic_rows, tok):
    records = prepare_records(synthetic_rows[:6])
    vids = verdict_token_ids(tok, "Yes", "No")
    all_loops = extract_features(tiny_model, records, [1, 2, 3], vids, FeatureConfig(batch_size=4))
    only_two = extract_features(tiny_model, records, [2], vids, FeatureConfig(batch_size=6))
    assert all_loops.states.shape == (3, 3, 6, 2, 64)  # [T, L'=2 layers + norm, N, K, H]
    torch.testing.assert_close(all_loops.states[1], only_two.states[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(all_loops.verdict_logp[1], only_two.verdict_logp[0], rtol=1e-4, atol=1e-4)
    # batching with right padding does not change a record's features
    single = extract_features(tiny_model, records[:1], [1, 2, 3], vids, FeatureConfig(batch_size=1))
    torch.testing.assert_close(all_loops.states[:, :, :1], single.states, rtol=1e-4, atol=1e-4)


def test_reused_features_run_each_record_once_per_block(tiny_model, synthetic_rows, tok):
    """Inside reused_features() a record already extracted (a family's part of a pooled evaluation) is not run
    again and gets its first values; a new record is run; outside the block, or with other weights, nothing is
    reused."""
    records = prepare_records(synthetic_rows[:8])
    vids = verdict_token_ids(tok, "Yes", "No")
    calls = []
    hook = tiny_model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        with reused_features():
            pooled = extract_features(tiny_model, records[:6], [1, 2], vids, FeatureConfig(batch_size=4))
            assert len(calls) == 2
            part = extract_features(tiny_model, [records[4], records[1]], [1, 2], vids, FeatureConfig(batch_size=4))
            assert len(calls) == 2  # both were in the pooled call: the model did not run
            assert torch.equal(part.states, pooled.states[:, :, [4, 1]])
            assert torch.equal(part.verdict_logp, pooled.verdict_logp[:, [4, 1]])
            assert part.ids == [records[4].id, records[1].id] and list(part.labels) == [
                records[4].label,
                records[1].label,
            ]
            mixed = extract_features(tiny_model, [records[7], records[2]], [1, 2], vids, FeatureConfig(batch_size=4))
            assert len(calls) == 3  # only record 7 ran
            assert torch.equal(mixed.states[:, :, 1], pooled.states[:, :, 2])
            alone = extract_features(tiny_model, [records[7]], [1, 2], vids, FeatureConfig(batch_size=1))
            torch.testing.assert_close(mixed.states[:, :, 0], alone.states[:, :, 0])
            assert len(calls) == 3
            # other loops asked: other settings, run again
            extract_features(tiny_model, records[:2], [1], vids, FeatureConfig(batch_size=4))
            assert len(calls) == 4
        extract_features(tiny_model, records[:2], [1, 2], vids, FeatureConfig(batch_size=4))
        assert len(calls) == 5  # outside the block: run
    finally:
        hook.remove()
    other = OuroForCausalLM(tiny_model.config).eval()  # another model object: never the first one's values
    with reused_features():
        extract_features(tiny_model, records[:2], [1, 2], vids, FeatureConfig(batch_size=4))
        theirs = extract_features(other, records[:2], [1, 2], vids, FeatureConfig(batch_size=4))
    direct = extract_features(other, records[:2], [1, 2], vids, FeatureConfig(batch_size=4))
    assert torch.equal(theirs.states, direct.states)


def test_reused_features_serve_a_subset_of_layers_and_keep_adapters_apart(tiny_model, synthetic_rows, tok):
    """A record kept with layers (1, norm) serves a later ask for layer 1 alone (the before-evaluation's features
    read again for the probe_distill targets) without a forward, with the same values; an ask for a layer it was not
    extracted at runs the model. The same model with LoRA adapters on is another function (not served the base's
    values), with them switched off it is the base again."""
    from peft import LoraConfig, get_peft_model

    records = prepare_records(synthetic_rows[:6])
    vids = verdict_token_ids(tok, "Yes", "No")
    base = OuroForCausalLM(tiny_model.config).eval()
    calls = []
    hook = base.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        with reused_features():
            wide = extract_features(base, records, [1], vids, FeatureConfig(batch_size=6, layers=[1, 2]))
            assert len(calls) == 1
            narrow = extract_features(base, records[2:], [1], vids, FeatureConfig(batch_size=6, layers=[1]))
            assert len(calls) == 1 and narrow.layers == [1]
            assert torch.equal(narrow.states[:, 0], wide.states[:, 0, 2:])
            # the layers asked are not all kept: the model runs
            extract_features(base, records[:2], [1], vids, FeatureConfig(batch_size=6, layers=[0, 2]))
            assert len(calls) == 2
            peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
            assert len(calls) == 2
            on = extract_features(peft, records[:2], [1], vids, FeatureConfig(batch_size=6, layers=[1]))
            assert len(calls) == 3  # adapters on: another function, run (and its values differ from the base's)
            assert not torch.allclose(on.states[:, 0], wide.states[:, 0, :2])
            with peft.disable_adapter():
                off = extract_features(peft, records[:2], [1], vids, FeatureConfig(batch_size=6, layers=[1]))
            assert len(calls) == 3 and torch.equal(off.states[:, 0], wide.states[:, 0, :2])
    finally:
        hook.remove()
    direct = extract_features(base, records[2:], [1], vids, FeatureConfig(batch_size=1, layers=[1]))
    torch.testing.assert_close(narrow.states, direct.states)


@pytest.mark.slow
def test_evaluate_gap_writes_reports(tiny_model, tok, synthetic_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = GapConfig(
        loops="1-3",
        verdict_tokens=("Yes", "No"),
        n_boot=100,
        readout=ReadoutConfig(l2_grid=(1e-2, 1.0), split="kfold", folds=3),
        task=TaskConfig(max_new_tokens=4, max_tasks=6),
        tp_loops=[1, 5],  # 5 > total_ut_steps: extrapolation
        sampled_verdict=True,
        sampled_max_new_tokens=2,
    )
    out = tmp_path / "before"
    res = evaluate_gap(
        tiny_model,
        tok,
        Dataset.from_list(synthetic_rows),
        config=cfg,
        out_dir=str(out),
        wandb=True,
        wandb_kwargs={"dir": str(tmp_path / "wandb"), "project": "test"},
    )
    names = set(os.listdir(out))
    for stem in ("sv_vs_loop", "rr_vs_loop", "gap_vs_loop", "rr_heatmap"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert {"gap.json", "gap.md", "probes.safetensors", "probes.json"} <= names
    assert not [n for n in names if n.startswith(".tmp")]
    assert (out / "sv_vs_loop.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "gap.json").read_text())
    assert [r["loop"] for r in data["table"]] == [1, 2, 3]
    assert res.meta["n_eval"] == len(synthetic_rows)  # k-fold: every record scored once
    for row in res.table:
        assert row["sv_lo"] <= row["sv"] <= row["sv_hi"] and row["rr_lo"] <= row["rr"] <= row["rr_hi"]
        assert row["gap"] == pytest.approx(row["rr"] - row["sv"])
    assert [r["loop"] for r in res.tp] == [1, 5] and res.tp[0]["n"] == 6
    assert len(res.sv_sampled) == 3 and all(0 <= r["unparseable"] <= r["n"] for r in res.sv_sampled)
    md = (out / "gap.md").read_text()
    assert "| loop | SV | RR | gap RR−SV" in md and md == res.markdown()
    probes = load_probes(str(out / "probes"))
    assert {"loop1_best", "loop3_fixed"} <= set(probes) and probes["loop3_fixed"].meta["layer_name"] == "norm"
    assert list((tmp_path / "wandb").rglob("*.wandb"))

    # the JSON round-trips, and compare() gives an explicit verdict
    again = GapResult.from_json(str(out))
    assert again.table == json.loads(res.to_json())["table"]
    same = compare(again, res)
    assert same.paired and not same.sv_improved and not same.passed and same.outcome == "no"
    assert same.summary["d_sv"] == 0.0 and same.verdict.startswith("Verdict: no")
    # evaluated without frozen_probes: the frozen half of part (c) is absent, so (c) cannot pass
    assert not same.frozen_readout and not same.rr_preserved and "frozen readout absent" in same.verdict
    # TP was measured at loops 1 and 5, not at the trained depth: said, not blocking
    assert not same.tp_measured and same.tp_kept and "TP not measured" in same.verdict
    # an "after" whose SV is right everywhere, with the before probes' posteriors unchanged: every part passes
    after = GapResult.from_json(res.to_json())
    ids, y, ev, svp, svd, rrp = after.arrays()
    after.records["sv_prob"] = np.where(y[None] == 1, 0.9, 0.1).repeat(len(after.loops), 0).tolist()
    after.records["sv_pred"] = np.repeat(y[None], len(after.loops), 0).tolist()
    after.records["rr_frozen_prob"] = after.records["rr_prob"]
    comp = compare(res, after, CompareConfig(n_boot=200))
    assert comp.sv_improved and comp.sv_caught_up and comp.gap_closed and comp.rr_preserved and comp.passed
    assert comp.sv_past_base_readout  # SV at 100% is far past what a random model's probe reads
    assert comp.verdict.startswith("Verdict: yes") and "(c) RR preserved, both ways: yes" in comp.verdict
    assert "| loop | SV before" in comp.markdown()
    json.loads(comp.to_json())


def test_integer_verifier():
    assert integer_verifier("so the answer is 1,234.", "#### 1234") is True
    assert integer_verifier("42 or 43", "42") is False
    assert integer_verifier("no idea", "42") is None
