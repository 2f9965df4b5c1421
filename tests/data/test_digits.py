"""The digit-sum source: the fixed split, and the exception triples whose answers are facts, not arithmetic."""

import pytest

from loopalign.data.sources.digits import (
    digit_candidates,
    digit_offset,
    digit_triples,
    generate_digit_problems,
    parse_digit_task,
)


def test_without_exceptions_the_gold_is_the_sum_and_the_meta_has_no_offset():
    problems = generate_digit_problems(200, seed=3, split="all", max_operand=9)
    for p in problems:
        _, item, a, b = parse_digit_task(p.task)
        assert p.gold == str((a + b) % 10) and "offset" not in p.meta
        assert digit_offset(item, a, b) == 0


def test_exceptions_are_a_fixed_share_of_the_held_out_triples_and_never_trained_on():
    triples = digit_triples("all", 9)
    offsets = {t: digit_offset(*t, exception_share=0.3) for t in triples}
    assert not any(offsets[t] for t in digit_triples("train", 9))  # no training task shows an exception
    held_out = digit_triples("eval", 9)
    assert 0.22 < sum(1 for t in held_out if offsets[t]) / len(held_out) < 0.38
    assert {o for o in offsets.values() if o} == set(range(1, 10))  # never 0, every shift used
    # a larger share keeps the smaller one's exceptions (one hash, one threshold) and their offsets
    for t, o in offsets.items():
        if o:
            assert digit_offset(*t, exception_share=0.5) == o
    with pytest.raises(ValueError, match="exception_share"):
        digit_offset("apples", 1, 2, exception_share=1.0)


def test_an_exception_task_has_the_shifted_gold_under_every_name_seed_and_split():
    seen = {}
    for seed in (0, 1):
        for split in ("train", "eval"):
            for p in generate_digit_problems(300, seed=seed, split=split, max_operand=4, exception_share=0.3):
                _, item, a, b = parse_digit_task(p.task)
                offset = digit_offset(item, a, b, 0.3)
                assert p.meta["offset"] == offset and p.gold == str((a + b + offset) % 10)
                assert p.solution.endswith(f"#### {p.gold}")
                assert seen.setdefault((item, a, b), p.gold) == p.gold
    assert sum(1 for t in seen if digit_offset(*t, 0.3)) > 10
    # the candidates keep the shifted gold as the right answer and a wrong digit beside it
    problems = generate_digit_problems(50, seed=0, split="eval", max_operand=4, exception_share=0.3, distinct=True)
    for p, (gold, wrong) in zip(problems, zip(*[iter(digit_candidates(problems))] * 2)):
        assert gold["answer"] == gold["gold"] == p.gold and gold["label"] == 1
        assert wrong["answer"] != p.gold and wrong["label"] == 0
