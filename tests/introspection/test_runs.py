"""Short real runs: GRPO (PEFT LoRA, injected rollouts) logs rewards and the false-positive rate; the SFT mode
trains; the eval protocol writes its reports."""

import json
import math

import pytest
import torch


@pytest.fixture
def fresh_model(tok):
    from loopalign import OuroForCausalLM, tiny_config

    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok)))


def test_short_grpo_run_logs_rewards_and_false_positive_rate(fresh_model, tok, tiny, tmp_path):
    from peft import LoraConfig

    from loopalign.trainers import IntrospectionGRPOConfig, IntrospectionGRPOTrainer, introspection_dataset

    _, vectors = tiny
    ds = introspection_dataset(tok, vectors, layers=[1], injection_loops=[3], extraction_loops=[3], n_rows=4)
    assert sorted(ds["trial_type"]) == ["control", "control", "injection", "injection"]
    args = IntrospectionGRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, learning_rate=1e-3, beta=0.04, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", introspection_rewards={"detection": 1.0, "identification": 1.0, "false_positive": 2.0},
    )  # fmt: skip
    trainer = IntrospectionGRPOTrainer(
        model=fresh_model, args=args, train_dataset=ds, concept_vectors=vectors, processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    assert args.reward_weights == [1.0, 1.0, 2.0]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2
    keys = set().union(*logs)
    for k in ("rewards/introspection_detection/mean", "rewards/introspection_false_positive/mean", "kl"):
        assert k in keys
    fp = [h["introspection/false_positive"] for h in logs if "introspection/false_positive" in h]
    assert fp and all(0.0 <= v <= 1.0 for v in fp)
    assert all(math.isfinite(h["loss"]) for h in logs)


def _sft_losses(model, tok, vectors, ds, out, steps: int, batch_size: int) -> list[float]:
    """The logged losses of a short SFT-mode run (the real IntrospectionSFTTrainer, one step a log line)."""
    from loopalign.trainers import IntrospectionSFTConfig, IntrospectionSFTTrainer

    args = IntrospectionSFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=3e-3,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
    )  # fmt: skip
    trainer = IntrospectionSFTTrainer(model=model, args=args, train_dataset=ds, concept_vectors=vectors,
                                      processing_class=tok)  # fmt: skip
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_short_sft_mode_run(fresh_model, tok, tiny, tmp_path):
    from loopalign.trainers import introspection_dataset

    _, vectors = tiny
    ds = introspection_dataset(tok, vectors, layers=[1], n_rows=8, with_targets=True)
    assert any(c.startswith("Yes, I detect") for c in ds["completion"])
    assert "No, I do not detect an injected thought." in ds["completion"]
    losses = _sft_losses(fresh_model, tok, vectors, ds, tmp_path, steps=4, batch_size=4)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_eval_protocol_writes_reports(tiny, tok, tmp_path):
    from loopalign.eval.introspection import IntrospectionConfig, evaluate_introspection

    model, vectors = tiny
    cfg = IntrospectionConfig(
        loop_counts=(2, 3), layers=(1,), strengths=(4.0,), concepts=("Dust", "Satellites"), n_controls=2,
        random_vectors=True, n_random=1, control_questions=True, n_control_questions=1, max_new_tokens=3,
        n_boot=50, batch_size=32,
    )  # fmt: skip
    res = evaluate_introspection(model, tok, vectors, cfg, out_dir=str(tmp_path))
    kinds = [r["trial_type"] for r in res.records]
    # N=2: 2x2 (ext, inj) cells, N=3: 3x3; 2 concepts + 1 question + 1 random each; 2 controls per N,
    # and the question once per N with nothing injected
    assert kinds.count("injection") == 2 * (4 + 9) and kinds.count("control") == 4
    assert kinds.count("random") == 13 and kinds.count("control_question") == 13 + 2
    uninjected = [r for r in res.records if r["trial_type"] == "control_question" and not r["injected"]]
    assert len(uninjected) == 2 and all(r["strength"] == 0.0 for r in uninjected)
    assert {q["strength"] for q in res.summary["control_questions"]} == {0.0, 4.0}
    h = res.summary["heatmaps"]
    assert set(h) == {"2", "3"} and len(h["3"]["identification"]) == 3 and len(h["3"]["identification"][0]) == 3
    rows = res.summary["by_injection_loop"]
    assert [(r["num_loops"], r["injection_loop"]) for r in rows] == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    for r in rows:
        for k in ("detection", "identification", "false_positive"):
            assert r[k]["lo"] <= r[k]["rate"] <= r[k]["hi"]
    for name in ("introspection.json", "introspection.md", "trials.jsonl", "identification_heatmap.png",
                 "identification_heatmap.svg"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "introspection.json").read_text())
    assert saved["summary"]["heatmaps"]["2"]["extraction_loops"] == [0, 1]
    assert not list(tmp_path.glob(".tmp-*"))
    assert "Identification heatmap, N = 3" in res.markdown()


def test_random_vector_controls_run_at_every_strength_unless_one_is_set(tiny, tok):
    from loopalign.eval.introspection import IntrospectionConfig, build_eval_trials

    model, vectors = tiny
    base = dict(loop_counts=(2,), extraction_loops=(1,), injection_loops=(1,), layers=(1,), strengths=(1.0, 4.0),
                concepts=("Dust",), n_controls=0, random_vectors=True, n_random=2)  # fmt: skip
    every = build_eval_trials(tok, vectors, IntrospectionConfig(**base), model.config)
    assert sorted(t["strength"] for t in every if t["trial_type"] == "random") == [1.0, 1.0, 4.0, 4.0]
    one = build_eval_trials(tok, vectors, IntrospectionConfig(**base, random_strength=8.0), model.config)
    assert sorted(t["strength"] for t in one if t["trial_type"] == "random") == [8.0, 8.0]
    with pytest.raises(ValueError, match="random_strength"):
        IntrospectionConfig(**base, random_strength=0.0)


def test_norm_matched_injection_scales_to_the_residual_norm_at_the_site(tiny, tok):
    from loopalign.eval.introspection import (
        IntrospectionConfig,
        build_eval_trials,
        evaluate_introspection,
        residual_site_norms,
        trial_vector,
    )
    from loopalign.hooks import capture_activations

    model, vectors = tiny
    cfg = IntrospectionConfig(loop_counts=(3,), extraction_loops=(2,), injection_loops=(0, 2), layers=(1,),
                              strengths=(0.5,), concepts=("Dust",), n_controls=1, random_vectors=True, n_random=1,
                              max_new_tokens=2, norm_matched=True)  # fmt: skip
    trials = build_eval_trials(tok, vectors, cfg, model.config)
    norms = residual_site_norms(model, trials)
    assert set(norms) == {(3, 0, 1), (3, 2, 1)} and all(v > 0 for v in norms.values())
    t = next(t for t in trials if t["trial_type"] == "injection" and t["injection_loop"] == 2)
    with capture_activations(model, [(2, 1)]) as cap, torch.no_grad():
        model(input_ids=torch.tensor([t["input_ids"]]), num_loops=3, use_cache=False)
    manual = float(cap.get(2, 1)[0, t["injection_start"] :].norm(dim=-1).mean())
    assert abs(norms[(3, 2, 1)] - manual) < 1e-5
    for trial in (t, next(x for x in trials if x["trial_type"] == "random")):
        v = trial_vector(trial, vectors, model.config.hidden_size, site_norm=norms[(3, 2, 1)])
        assert abs(float(v.norm()) - 0.5 * norms[(3, 2, 1)]) < 1e-4
    res = evaluate_introspection(model, tok, vectors, cfg)
    assert res.config["norm_matched"] and "Norm-matched injection" in res.markdown()


def test_training_rows_with_negatives_inject_what_they_say_and_train(fresh_model, tok, tiny, tmp_path):
    """[introspection-v3] item 4: random-vector rows (target: no detection) and "no"-answer question rows, half of
    them injected (target "No."), beside the concept and control rows; their questions are never the evaluation's
    control questions, and an SFT run trains on the mix."""
    from loopalign.eval.introspection.trials import CONTROL_QUESTIONS
    from loopalign.injection import injection_spec
    from loopalign.trainers import introspection_dataset
    from loopalign.trainers.introspection.data import (
        NO_DETECT_TARGET,
        QUESTION_TARGET,
        TRAINING_QUESTIONS,
        validate_injection_rows,
    )

    model, vectors = tiny
    assert not set(TRAINING_QUESTIONS) & set(CONTROL_QUESTIONS)
    ds = introspection_dataset(tok, vectors, layers=[1], n_rows=20, with_targets=True, control_fraction=0.2,
                               random_fraction=0.2, question_fraction=0.2, seed=3)  # fmt: skip
    kinds = ds["trial_type"]
    assert [kinds.count(k) for k in ("injection", "control", "random", "control_question")] == [8, 4, 4, 4]
    rows = list(ds)
    for r in rows:
        if r["trial_type"] == "random":
            assert r["completion"] == NO_DETECT_TARGET and r["injected"] and not r["concept"]
        if r["trial_type"] == "control_question":
            assert r["completion"] == QUESTION_TARGET and r["question"] in r["prompt"]
            assert 0 <= r["injection_start"] < r["prompt_length"]
    questions = [r for r in rows if r["trial_type"] == "control_question"]
    assert sorted(r["injected"] for r in questions) == [False, False, True, True]
    validate_injection_rows(ds, vectors, model.config)
    spec = injection_spec(rows, vectors, model.config.hidden_size)
    norms = spec["injection_vector"].norm(dim=-1)
    for r, n in zip(rows, norms):  # an injected row adds a vector, an uninjected one nothing
        assert (n > 0) == bool(r["injected"]), r["trial_type"]
    seeds = {r["vector_seed"] for r in rows if r["trial_type"] == "random"}
    assert len(seeds) == 4  # a direction of its own per random row
    with pytest.raises(ValueError, match="sum below 1"):
        introspection_dataset(tok, vectors, control_fraction=0.5, random_fraction=0.3, question_fraction=0.2)
    losses = _sft_losses(fresh_model, tok, vectors, ds, tmp_path, steps=3, batch_size=5)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
