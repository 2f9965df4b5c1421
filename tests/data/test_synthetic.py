import re

import pytest

from loopalign.data.sources import SyntheticConfig, generate_problems


def test_deterministic_and_prefix_stable():
    a = generate_problems(40, seed=3)
    assert [(p.id, p.task, p.gold) for p in a] == [(p.id, p.task, p.gold) for p in generate_problems(40, seed=3)]
    assert [p.task for p in generate_problems(10, seed=3)] == [p.task for p in a[:10]]
    assert [p.task for p in generate_problems(40, seed=4)] != [p.task for p in a]


def test_levels_and_gold_are_consistent():
    probs = generate_problems(60, seed=0, levels=(1, 2, 3, 4, 5, 6))
    for p in probs:
        level = p.meta["level"]
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", p.solution)
        assert len(steps) == level == len(p.meta["steps"])
        value = p.meta["start"]
        for a, op, b, c in steps:
            assert int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(c) >= 0
        assert p.gold == str(value) and p.solution.endswith(f"#### {value}")
        assert p.task.endswith("have now?") and p.task.count(".") == level + 1
    level1 = [p for p in probs if p.meta["level"] == 1]
    assert level1 and all(p.meta["start"] <= 9 for p in level1)


def test_problems_are_short(tok):
    lengths = [len(tok(p.task)["input_ids"]) for p in generate_problems(40, seed=1)]
    assert max(lengths) < 120


def test_config_validation():
    with pytest.raises(ValueError, match="levels"):
        SyntheticConfig(levels=(0, 2))
    with pytest.raises(ValueError, match="n"):
        SyntheticConfig(n=-1)
