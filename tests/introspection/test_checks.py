"""[introspection-v2] item 6: Lindsey et al.'s thoughts-vs-text and prefill checks on the injection machinery."""

import pytest
import torch

from loopalign.eval.introspection.checks import (
    REPEAT_QUESTION,
    SENTENCES,
    THINK_QUESTION,
    ChecksConfig,
    build_check_trials,
    grade_check,
    line_prompt,
    run_checks,
)
from loopalign.injection import inject_rows


def test_the_injection_span_is_the_sentence(tok):
    for prefill in (None, "Dust"):
        prompt, ids, start, end = line_prompt(tok, THINK_QUESTION, SENTENCES[0], prefill)
        assert tok.decode(ids[start:end]).strip() == SENTENCES[0]
        assert (prefill is None) == ("accident" not in prompt)


def test_inject_rows_end_bounds_the_injection(tiny, tok):
    model, vectors = tiny
    _, ids, start, end = line_prompt(tok, REPEAT_QUESTION, SENTENCES[1])
    x = torch.tensor([ids])
    v = 8 * vectors.vector("Dust", 3, 1)[None]
    with torch.no_grad():
        with inject_rows(model, v, [3], [1], [start], ends=[end]):
            bounded = model(input_ids=x).logits
        with inject_rows(model, v, [3], [1], [start]):
            open_ended = model(input_ids=x).logits
        with inject_rows(model, v, [3], [1], [start]):
            prefix = model(input_ids=x[:, :end]).logits
    assert torch.allclose(bounded[0, :end], prefix[0], atol=1e-5)  # the same injection up to the end
    assert not torch.allclose(bounded[0, end:], open_ended[0, end:], atol=1e-4)  # none after it


def test_grades_follow_the_responses():
    t = {"concept": "Snow", "sentence": SENTENCES[0]}
    assert grade_check("Snow.", t)["names_concept"] and not grade_check("Bread.", t)["names_concept"]
    assert grade_check("The old clock on the wall ticked loudly.", t)["repeated"]
    assert not grade_check("The old clock ticked.", t)["repeated"]
    assert grade_check("It was an accident.", t)["disowns"] and not grade_check("It was an accident.", t)["accepts"]
    assert grade_check("Yes, I meant to say it.", t)["accepts"]
    assert grade_check("No, I did not mean that.", t)["disowns"]


def test_checks_run_end_to_end_with_baselines(tiny, tok, tmp_path):
    model, vectors = tiny
    cfg = ChecksConfig(num_loops=4, extraction_loop=3, injection_loop=3, layer=1, strengths=(4.0,),
                       concepts=("Dust", "Satellites"), n_sentences=2, max_new_tokens=3)  # fmt: skip
    trials = build_check_trials(tok, vectors, cfg)
    assert len(trials) == 2 * 2 * 3 * 2  # concepts x sentences x checks x (uninjected, strength 4)
    assert {t["strength"] for t in trials if not t["injected"]} == {0.0}
    res = run_checks(model, tok, vectors, cfg, out_dir=str(tmp_path))
    rows = {(r["check"], r["measure"]) for r in res["summary"]}
    assert rows == {("think", "names_concept"), ("repeat", "repeated"), ("repeat", "names_concept"),
                    ("prefill", "accepts"), ("prefill", "disowns")}  # fmt: skip
    assert all(r["injected"]["n"] == 4 and r["uninjected"]["n"] == 4 for r in res["summary"])
    assert (tmp_path / "checks.md").read_text().count("| prefill |") == 2
    with pytest.raises(ValueError, match="n_sentences"):
        ChecksConfig(n_sentences=0)
