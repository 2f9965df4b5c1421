import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopalign.data.candidates import (
    ControlledConfig,
    SamplingConfig,
    balance_labels,
    controlled_candidates,
    deduplicate,
    sample_candidates,
    wrong_answer,
)
from loopalign.data.schema import meta_dict, validate_records
from loopalign.data.sources import Problem, generate_problems, load_safety_prompts
from loopalign.data.verifiers import verify_math


def test_controlled_balanced_and_truly_wrong():
    probs = generate_problems(60, seed=0)
    recs = controlled_candidates(probs, ControlledConfig(seed=1))
    validate_records(recs)
    assert sum(r["label"] for r in recs) == 60 and len(recs) == 120
    kinds = {meta_dict(r)["kind"] for r in recs if r["label"] == 0}
    assert kinds == {"off_by_k", "wrong_operation", "digit_swap"}
    for r in recs:
        assert verify_math(r["answer"], r["gold"]).label == r["label"]
    assert recs == controlled_candidates(probs, ControlledConfig(seed=1))
    assert recs != controlled_candidates(probs, ControlledConfig(seed=2))


def test_wrong_answer_kinds():
    p = Problem("p", "q?", "132", "t", meta={"last_op": ["12", "*", "11"]})
    rng = random.Random(0)
    assert wrong_answer(p, "digit_swap", rng)[0] in {"312", "123"}
    value, info = wrong_answer(p, "off_by_k", rng, max_k=2)
    assert abs(int(value) - 132) == abs(info["k"]) and 1 <= abs(info["k"]) <= 2
    value, info = wrong_answer(p, "wrong_operation", rng)
    assert value in {"23", "1"} and info["op"] == "*"
    assert wrong_answer(Problem("p", "q", "7", "t"), "wrong_operation", rng) is None  # no last step recorded
    assert wrong_answer(Problem("p", "q", "77", "t"), "digit_swap", rng) is None  # swap changes nothing
    assert wrong_answer(Problem("p", "q", "0", "t"), "off_by_k", rng)[0] != "-1"  # stays non-negative


def test_more_wrong_answers_and_format():
    recs = controlled_candidates(
        generate_problems(10, seed=0, levels=(3,)),
        ControlledConfig(wrong_per_problem=3, answer_format="The answer is {answer}."),
    )
    by_problem = {}
    for r in recs:
        by_problem.setdefault(meta_dict(r)["problem_id"], []).append(r["answer"])
    assert all(len(set(v)) == len(v) >= 3 for v in by_problem.values())
    assert all(r["answer"].startswith("The answer is ") for r in recs)
    with pytest.raises(ValueError, match="kinds"):
        ControlledConfig(kinds=("nope",))


def test_sample_from_tiny_ouro(tok, tiny_ouro):
    probs = generate_problems(3, seed=0)
    cfg = SamplingConfig(
        n_samples=2, temperature=1.0, max_new_tokens=6, num_loops=2, batch_size=2, seed=5, on_unparsed="keep"
    )
    recs, report = sample_candidates(tiny_ouro, tok, probs, cfg)
    validate_records(recs)
    assert report.counts["generated"] == 6 == report.counts["kept"] + report.counts["dropped_empty"]
    assert report.counts["parse_status=ok"] + report.counts["parse_status=unparsed"] == 6
    assert report.counts["max_new_tokens"] == 6
    for r in recs:
        meta = meta_dict(r)
        v = verify_math(r["answer"], r["gold"], lenient="whole")
        if meta["truncated"]:  # cut off by the budget: unparsed whatever number it holds
            assert (r["label"], r["parse_status"]) == (0, "unparsed")
        else:
            assert (r["label"], r["parse_status"]) == (v.label, v.parse_status)
        assert meta["num_loops"] == 2
    again, _ = sample_candidates(tiny_ouro, tok, probs, cfg)
    assert [r["answer"] for r in again] == [r["answer"] for r in recs]
    assert tok.padding_side == "right"  # restored


def test_left_padding_batch_equals_single(tok, tiny_ouro):
    probs = generate_problems(3, seed=2, levels=(1, 4, 2))  # different prompt lengths
    cfg = SamplingConfig(n_samples=1, temperature=0, max_new_tokens=6, num_loops=3, batch_size=3, on_unparsed="keep")
    batched, _ = sample_candidates(tiny_ouro, tok, probs, cfg)
    single = []
    for p in probs:
        single += sample_candidates(tiny_ouro, tok, [p], cfg)[0]
    assert [r["answer"] for r in batched] == [r["answer"] for r in single]


def test_num_loops_changes_ouro_output(tok, tiny_ouro):
    probs = generate_problems(2, seed=0)
    outs = [
        [
            r["answer"]
            for r in sample_candidates(
                tiny_ouro, tok, probs, SamplingConfig(1, 0, max_new_tokens=8, num_loops=k, on_unparsed="keep")
            )[0]
        ]
        for k in (1, 4)
    ]
    assert outs[0] != outs[1]


def test_any_causal_lm_and_safety_prompts(tok, fixtures):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=1,
        )
    ).eval()
    probs = load_safety_prompts(str(fixtures / "xstest" / "xstest_prompts.csv")).items[:2]
    recs, report = sample_candidates(llama, tok, probs, SamplingConfig(n_samples=2, max_new_tokens=5))
    assert report.counts["generated"] == 4
    assert all(r["scenario"] == "safety" and r["parse_status"] == "na" for r in recs)
    with pytest.raises(ValueError, match="not a looped model"):
        sample_candidates(llama, tok, probs, SamplingConfig(n_samples=1, max_new_tokens=2, num_loops=2))


def test_cut_off_answers_are_unparsed_never_labelled(tok, tiny_ouro):
    """A sampled solution cut off by the token budget is unparsed (dropped by default, counted), even
    when the text so far holds a number; one that ends within the budget is labelled."""
    probs = generate_problems(4, seed=0)
    digit = tok.convert_tokens_to_ids("7")
    cut = SamplingConfig(n_samples=1, temperature=0, max_new_tokens=3, num_loops=1)
    recs, report = sample_candidates(_always(tiny_ouro, [digit]), tok, probs, cut)  # "777": a number, cut off
    assert report.counts["truncated"] == 4 and report.counts["dropped_unparsed"] == 4 and recs == []
    kept, _ = sample_candidates(
        _always(tiny_ouro, [digit]), tok, probs, SamplingConfig(1, 0, max_new_tokens=3, on_unparsed="keep")
    )
    assert [(r["answer"], r["label"], r["parse_status"]) for r in kept] == [("777", 0, "unparsed")] * 4

    # "7" then end of turn: finished within the budget, so labelled (a bare number is a final answer)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    recs, report = sample_candidates(
        _always(tiny_ouro, [digit, end]), tok, probs, SamplingConfig(1, 0, max_new_tokens=3)
    )
    assert report.counts["truncated"] == 0 and len(recs) == 4
    assert all(not meta_dict(r)["truncated"] and r["answer"] == "7" for r in recs)
    assert [r["label"] for r in recs] == [int(p.gold == "7") for p in probs]


def _always(model, script: list[int]):
    """A copy of ``model`` whose greedy output starts with ``script`` and repeats its last token: the
    generation config's sequence bias favours each scripted token after the one before it."""
    import copy

    clone = copy.deepcopy(model)
    bias = [[[script[0]], 100.0]] + [[[a, b], 100.0 * (i + 2)] for i, (a, b) in enumerate(zip(script, script[1:]))]
    clone.generation_config.sequence_bias = bias
    return clone


def test_sampling_budget_follows_the_source():
    from loopalign.data.sources import ANSWER_TOKEN_BUDGETS, answer_token_budget

    assert answer_token_budget("gsm8k") >= 256 and answer_token_budget("gsm8k-solutions") >= 256
    assert answer_token_budget(["digits", "gsm8k"]) == ANSWER_TOKEN_BUDGETS["gsm8k"]
    assert answer_token_budget("unknown-source") == 256
    assert SamplingConfig().max_new_tokens is None and SamplingConfig().on_unparsed == "drop"


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="n_samples=1"):
        SamplingConfig(n_samples=3, temperature=0)
    with pytest.raises(ValueError, match="on_unparsed"):
        SamplingConfig(on_unparsed="ignore")


def test_balance_and_dedupe():
    recs = controlled_candidates(generate_problems(20, seed=0), ControlledConfig(wrong_per_problem=3))
    assert sum(r["label"] == 0 for r in recs) > sum(r["label"] == 1 for r in recs)
    bal = balance_labels(recs, seed=0)
    assert sum(r["label"] == 0 for r in bal) == sum(r["label"] == 1 for r in bal) == 20
    assert bal == balance_labels(recs, seed=0)
    dup = recs[:4] + [dict(recs[0], id="copy", answer=f"  {recs[0]['answer']} ")]
    assert [r["id"] for r in deduplicate(dup)] == [r["id"] for r in recs[:4]]
    same_value = [dict(recs[0], id="a", answer="A: 6"), dict(recs[0], id="b", answer="#### 6")]
    assert len(deduplicate(same_value)) == 2 and len(deduplicate(same_value, by="extracted")) == 1


def test_dedupe_keeps_distinct_unparsed():
    base = controlled_candidates(generate_problems(1, seed=0))[0]
    recs = [
        dict(base, id="a", answer="no idea"),
        dict(base, id="b", answer="not sure"),
        dict(base, id="c", answer="no idea"),
    ]
    assert [r["id"] for r in deduplicate(recs, by="extracted")] == ["a", "b"]
