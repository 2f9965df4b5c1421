"""Probe distillation: frozen out-of-fold probe targets, partial labels, and the GapSFTTrainer term
(tiny random Ouro, real PEFT LoRA, real TRL trainer)."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig

from loopalign import OuroForCausalLM, tiny_config
from loopalign.eval.features import extract_features, prepare_records
from loopalign.trainers import GapSFTConfig, GapSFTTrainer, build_gap_features, fit_probe_targets
from loopalign.trainers.gap_data import GapCollator, verdict_token_ids

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_and_data(gap_dataset):
    ds, tok = gap_dataset
    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval(), ds, tok


def _swap_labels(ds, tasks: set[str]):
    """The same records with the labels swapped within each task in ``tasks`` (each task holds a
    gold and a wrong answer, so the task's label mix, hence the folds, stay the same)."""
    return ds.map(lambda r: {"label": 1 - r["label"] if r["task"] in tasks else r["label"]})


def test_targets_are_soft_per_loop_and_report_the_probes_quality(model_and_data):
    model, ds, tok = model_and_data
    out = fit_probe_targets(model, tok, ds, num_loops=3, n_folds=4, l2=0.1)
    targets = np.array(out.dataset["probe_target"])
    assert targets.shape == (len(ds), 3)
    assert ((targets > 0) & (targets < 1)).all()
    assert all(out.dataset["labelled"]) and out.n_labelled == len(ds)
    assert out.dataset.column_names == [*ds.column_names, "probe_target", "labelled"]
    summary = out.summary()
    assert len(summary["oof_auroc"]) == 3 and all(0 <= a <= 1 for a in summary["oof_auroc"])
    assert summary["layer"] == model.config.num_hidden_layers and summary["position"] == "verdict"
    assert summary["l2"] == [0.1] * 3
    json.dumps(summary)


def test_a_records_target_comes_from_a_probe_that_never_saw_its_label(model_and_data):
    model, ds, tok = model_and_data
    kw = dict(num_loops=2, n_folds=4, l2=0.1)  # one strength: no selection that could move with the labels
    before = np.array(fit_probe_targets(model, tok, ds, **kw).dataset["probe_target"])
    task = ds[0]["task"]
    after = np.array(fit_probe_targets(model, tok, _swap_labels(ds, {task}), **kw).dataset["probe_target"])
    own = np.array([t == task for t in ds["task"]])
    # the task's records are scored by the probe of the fold that left the task out: unchanged
    np.testing.assert_array_equal(after[own], before[own])
    # every other fold trained on the swapped labels
    assert np.abs(after[~own] - before[~own]).max() > 1e-4


def test_unlabelled_records_get_the_full_fit_and_their_labels_are_never_read(model_and_data):
    model, ds, tok = model_and_data
    kw = dict(num_loops=2, n_folds=3, label_fraction=0.5, seed=3)
    out = fit_probe_targets(model, tok, ds, **kw)
    labelled = np.array(out.dataset["labelled"])
    assert labelled.sum() == len(ds) // 2  # 24 tasks of 2 records: 12 whole tasks keep labels
    by_task = {}
    for task, flag in zip(ds["task"], labelled):
        by_task.setdefault(task, set()).add(bool(flag))
    assert all(len(flags) == 1 for flags in by_task.values())  # grouped by task
    assert set(np.array(ds["label"])[labelled]) == {0, 1}

    hidden_tasks = {t for t, flags in by_task.items() if flags == {False}}
    swapped = fit_probe_targets(model, tok, _swap_labels(ds, hidden_tasks), **kw)
    assert swapped.dataset["labelled"] == out.dataset["labelled"]
    np.testing.assert_array_equal(np.array(swapped.dataset["probe_target"]), np.array(out.dataset["probe_target"]))

    # unlabelled records: P(label 1) of the probe fit on all labelled records, at the verdict state
    records = prepare_records(ds)
    feats = extract_features(model, records, [1, 2], verdict_token_ids(tok), pad_id=tok.pad_token_id)
    x = feats.states[:, -1, :, -1]  # [T, N, H]: normed loop state, verdict position
    hidden = torch.as_tensor(np.flatnonzero(~labelled))
    targets = torch.tensor(out.dataset["probe_target"], dtype=torch.float32)
    for t, probe in enumerate(out.probes):
        torch.testing.assert_close(targets[hidden, t], probe.predict_proba(x[t][hidden]), atol=1e-5, rtol=1e-4)
    other = fit_probe_targets(model, tok, ds, **{**kw, "seed": 4})
    assert other.dataset["labelled"] != out.dataset["labelled"]  # the subset follows the seed


def test_centred_targets_keep_each_groups_ranking_and_put_half_its_unlabelled_records_on_each_side(model_and_data):
    """center_groups: each group's unlabelled targets shift by minus their median logit (the group assumed
    balanced); the labelled records' out-of-fold targets and every group's ranking stay as they were."""
    model, ds, tok = model_and_data
    kw = dict(num_loops=2, n_folds=3, label_fraction=0.5, seed=3, l2=0.1)
    groups = ["even" if i % 4 < 2 else "odd" for i in range(len(ds))]
    plain = fit_probe_targets(model, tok, ds, **kw)
    centred = fit_probe_targets(model, tok, ds, **kw, center_groups=groups)
    before, after = np.array(plain.dataset["probe_target"]), np.array(centred.dataset["probe_target"])
    labelled = np.array(centred.dataset["labelled"])
    np.testing.assert_array_equal(after[labelled], before[labelled])
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    for g in ("even", "odd"):
        idx = np.flatnonzero(~labelled & (np.array(groups) == g))
        for t in range(2):
            assert np.median(logit(after[idx, t])) == pytest.approx(0.0, abs=1e-6)
            assert np.array_equal(np.argsort(after[idx, t], kind="stable"), np.argsort(before[idx, t], kind="stable"))
            shift = logit(after[idx, t]) - logit(before[idx, t])
            assert shift == pytest.approx(np.full(len(idx), centred.centering[g][t]), abs=1e-5)
    assert set(centred.summary()["centering"]) == {"even", "odd"} and plain.summary()["centering"] == {}
    with pytest.raises(ValueError, match="center_groups names 3 groups"):
        fit_probe_targets(model, tok, ds, **kw, center_groups=["a", "b", "c"])


def test_adapters_are_off_while_the_targets_are_fit(model_and_data):
    from peft import get_peft_model

    model, ds, tok = model_and_data
    small = ds.select(range(16))
    base = fit_probe_targets(model, tok, small, num_loops=2, n_folds=2, l2=0.1)
    copy = OuroForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    peft = get_peft_model(copy, LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # an adapter that changes the states
        ids = torch.tensor([small[0]["input_ids"]])
        assert not torch.allclose(peft(input_ids=ids).logits, model(input_ids=ids).logits)
    tuned = fit_probe_targets(peft, tok, small, num_loops=2, n_folds=2, l2=0.1)
    np.testing.assert_allclose(tuned.dataset["probe_target"], base.dataset["probe_target"], atol=1e-5)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(label_fraction=0.0), r"label_fraction must be in \(0, 1\]"),
        (dict(label_fraction=1.5), r"label_fraction must be in \(0, 1\]"),
        (dict(n_folds=1), "n_folds must be an int >= 2"),
        (dict(position="start"), "position must be one of"),
        (dict(layer=5), "layer=5 is out of range"),
        (dict(l2=[]), "l2 must be"),
        (dict(n_folds=30), "n_folds=30 exceeds the 24 labelled groups"),
        (dict(label_fraction=0.04), r"labelled record\(s\) of class .* label_fraction=0.04"),
    ],
)
def test_bad_options_fail_naming_the_option(model_and_data, kw, message):
    model, ds, tok = model_and_data
    with pytest.raises(ValueError, match=message):
        fit_probe_targets(model, tok, ds, num_loops=2, **kw)


def test_too_few_records_of_a_class_fail_clearly(model_and_data):
    model, ds, tok = model_and_data
    one_positive = ds.filter(lambda r, i: r["label"] == 0 or i == 0, with_indices=True)
    with pytest.raises(ValueError, match=r"1 labelled record\(s\) of class 1"):
        fit_probe_targets(model, tok, one_positive, num_loops=2)
    flagged = ds.add_column("labelled", [True] * len(ds))
    with pytest.raises(ValueError, match="has a 'labelled' column, so label_fraction=0.5"):
        fit_probe_targets(model, tok, flagged, num_loops=2, label_fraction=0.5)


def test_features_drop_the_verdict_of_unlabelled_records(gap_dataset):
    ds, tok = gap_dataset
    flags = [i % 3 != 0 for i in range(len(ds))]
    marked = ds.add_column("labelled", flags).add_column("probe_target", [[0.25, 0.75]] * len(ds))
    plain = build_gap_features(ds, tok)
    feats = build_gap_features(marked, tok)
    assert "probe_target" in feats.column_names and "labelled" in feats.column_names
    for i, (a, b) in enumerate(zip(plain, feats)):
        if flags[i]:
            assert b["input_ids"] == a["input_ids"] and b["labels"] == a["labels"] and b["label"] == a["label"]
        else:
            assert b["input_ids"] == ds[i]["input_ids"]  # the prompt alone: the label is not in the input
            assert set(b["labels"]) == {-100} and b["label"] == -1
    whole = build_gap_features(marked, tok, completion_only=False)
    assert whole[0]["labels"] == ds[0]["input_ids"]  # the prompt may be modelled, the verdict not
    batch = GapCollator(tok.pad_token_id)([feats[i] for i in range(6)])
    assert batch["labelled"].tolist() == flags[:6]
    assert batch["probe_target"].shape == (6, 2) and batch["probe_target"].dtype == torch.float32
    assert batch["label"][0] == -1 and (batch["labels"][0] == -100).all()
    assert GapCollator(tok.pad_token_id)([plain[0], plain[1]])["labelled"].all()
    # an unlabelled record may have no label at all
    no_label = marked.map(lambda r, i: {"label": None if i == 0 else r["label"]}, with_indices=True)
    assert build_gap_features(no_label, tok)[0]["label"] == -1
    bad = marked.map(lambda r, i: {"probe_target": [1.5, 0.5] if i == 1 else r["probe_target"]}, with_indices=True)
    with pytest.raises(ValueError, match=f"record '{ds[1]['id']}': field 'probe_target' must be probabilities"):
        build_gap_features(bad, tok)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        num_loops=2,
        distill_folds=3,
    )
    base.update(kw)
    return GapSFTConfig(**base)


def _trainer(ds, tok, tmp_path, **kw):
    torch.manual_seed(0)
    return GapSFTTrainer(
        model=OuroForCausalLM(tiny_config(vocab_size=len(tok))),
        args=_args(tmp_path, **kw),
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
    )


def test_half_labelled_run_trains_with_probe_distillation(gap_dataset, tmp_path, capsys):
    ds, tok = gap_dataset
    trainer = _trainer(ds, tok, tmp_path, loss_weights={"lm": 1.0, "probe_distill": 1.0}, label_fraction=0.5)
    assert "probe OOF AUROC per loop (1..2)" in capsys.readouterr().out
    feats = trainer.train_dataset
    assert sum(feats["labelled"]) == len(ds) // 2
    assert all(len(t) == 2 for t in feats["probe_target"])
    hidden = [f for f in feats if not f["labelled"]]
    assert all(set(f["labels"]) == {-100} for f in hidden)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert np.isfinite(h["probe_distill_loss"]) and h["probe_distill_loss"] > 0
        assert "probe_distill/loop_1" in h and "probe_distill/loop_2" in h and "lm_loss" in h
    trainer.save_model(str(tmp_path / "final"))
    settings = json.loads((tmp_path / "final" / "gap_config.json").read_text())
    assert settings["label_fraction"] == 0.5 and settings["loss_weights"]["probe_distill"] == 1.0
    assert len(settings["probe_targets"]["oof_auroc"]) == 2 and settings["probe_targets"]["n_labelled"] == 24


def test_label_reading_terms_see_labelled_records_only(gap_dataset, tmp_path):
    ds, tok = gap_dataset
    weights = {"lm": 1.0, "probe_distill": 1.0, "probe": 1.0, "rr_probe": 1.0}
    trainer = _trainer(ds, tok, tmp_path, loss_weights=weights, label_fraction=0.5)
    feats = trainer.train_dataset
    hidden = [f for f in feats if not f["labelled"]][:6]
    model = trainer.model.train()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator(hidden)))
    loss.backward()
    metrics = trainer._metrics["train"]
    assert metrics["probe_loss"][-1] == 0.0 and metrics["rr_probe_loss"][-1] == 0.0 and metrics["lm_loss"][-1] == 0.0
    assert metrics["probe_distill_loss"][-1] > 0
    assert "sv/loop_1" not in metrics  # no labelled record: nothing to score
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    # the frozen base probes were fit on the labelled records only
    assert trainer.base_probes[0].meta["n_train"] == len(ds) // 2


def test_precomputed_targets_are_used_as_given(gap_dataset, tmp_path):
    ds, tok = gap_dataset
    given = ds.add_column("probe_target", [[0.3, 0.6]] * len(ds))
    trainer = _trainer(given, tok, tmp_path, loss_weights={"probe_distill": 1.0})
    assert trainer.probe_targets_summary is None and trainer.train_dataset[0]["probe_target"] == [0.3, 0.6]
    with pytest.raises(ValueError, match="already carries 'probe_target' but no 'labelled' column"):
        _trainer(given, tok, tmp_path, loss_weights={"probe_distill": 1.0}, label_fraction=0.5)
    with pytest.raises(ValueError, match=r"'probe_target' has \[2\] entries per record for num_loops=3"):
        _trainer(given, tok, tmp_path, loss_weights={"probe_distill": 1.0}, num_loops=3)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(label_fraction=0.0, loss_weights={"probe_distill": 1.0}), r"label_fraction must be in \(0, 1\]"),
        (dict(distill_folds=1), "distill_folds must be an int >= 2"),
        (dict(distill_position="start"), "distill_position must be one of"),
        (dict(distill_center_field="family"), "distill_center_field centres the probe_distill targets"),
        (dict(distill_kind="ranked", loss_weights={"probe_distill": 1.0}), "distill_kind must be one of"),
        (dict(distill_kind="pairwise", loss_weights={"probe_distill": 1.0}), "pairwise' compares records within"),
    ],
)
def test_bad_distillation_configs_fail_at_construction(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kw)


def test_labelled_only_baseline_trains_on_the_records_distillation_would_label(gap_dataset, tmp_path, capsys):
    """label_fraction < 1 without probe_distill: the labelled-only baseline, on exactly the records
    a probe-distillation run with the same seed keeps labels for."""
    ds, tok = gap_dataset
    trainer = _trainer(ds, tok, tmp_path, label_fraction=0.5)
    assert "training on the 24 of 48 records that keep their labels" in capsys.readouterr().out
    distilled = _trainer(ds, tok, tmp_path, loss_weights={"probe_distill": 1.0}, label_fraction=0.5)
    kept = {r["id"] for r in distilled.train_dataset if r["labelled"]}
    assert {r["id"] for r in trainer.train_dataset} == kept and len(kept) == 24


def test_pairwise_distillation_trains_on_pairs_within_each_task(gap_dataset, tmp_path):
    """distill_kind='pairwise' with the records' task as the group: each batch's term compares the records of one
    task (its gold and wrong answer) only, and a batch whose tasks are all different has no pair to train."""
    ds, tok = gap_dataset
    trainer = _trainer(
        ds, tok, tmp_path, loss_weights={"probe_distill": 1.0}, distill_kind="pairwise", distill_center_field="task"
    )
    feats = trainer.train_dataset
    tasks = sorted(set(ds["task"]))
    assert [tasks[g] for g in feats["distill_group"]] == list(ds["task"])
    model = trainer.model.train()
    pair = [i for i, t in enumerate(ds["task"]) if t == tasks[0]]
    assert len(pair) == 2
    loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator([feats[i] for i in pair])))
    assert trainer._metrics["train"]["probe_distill_loss"][-1] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    firsts = [feats[ds["task"].index(t)] for t in tasks[:4]]  # four records of four tasks: no pair
    trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator(firsts)))
    assert trainer._metrics["train"]["probe_distill_loss"][-1] == 0.0
    trainer.train()
    assert all(np.isfinite(h["probe_distill_loss"]) for h in trainer.state.log_history if "loss" in h)
