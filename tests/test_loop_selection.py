"""One parser for loop counts (1-based) and loop indices (0-based): loopalign.loops."""

import pytest

from loopalign.eval import parse_loops
from loopalign.loops import parse_int_set, parse_loop_counts, parse_loop_indices


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("1-4", [1, 2, 3, 4]), ("4,1,2,2", [1, 2, 4]), (" 1 - 2 , 6 ", [1, 2, 6]), (3, [3]), ([2, 1], [1, 2])],
)
def test_loop_counts(spec, expected):
    assert parse_loop_counts(spec) == expected
    assert parse_loops(spec) == expected  # the eval name is the same parser


@pytest.mark.parametrize("spec", ["0-3", "0", "3-1", "a", "", "all", [], [True], 0, "1.5", [1.0]])
def test_loop_counts_rejects_with_the_option_named(spec):
    with pytest.raises(ValueError, match="GapConfig.loops"):
        parse_loop_counts(spec, "GapConfig.loops")


def test_loop_counts_bounded_by_the_model_depth():
    assert parse_loop_counts("1-4", "eval_loops", max_loops=4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="eval_loops: 5 is out of range"):
        parse_loop_counts("1-5", "eval_loops", max_loops=4)


def test_loop_indices():
    assert parse_loop_indices("0-3") == (0, 1, 2, 3)
    assert parse_loop_indices("3,0") == (0, 3)
    assert parse_loop_indices("all") is None and parse_loop_indices(None) is None
    assert parse_loop_indices(2, num_loops=4) == (2,)
    with pytest.raises(ValueError, match="injection_loops: 4 is out of range"):
        parse_loop_indices("0,4", "injection_loops", num_loops=4)
    with pytest.raises(ValueError, match="injection_loops"):
        parse_loop_indices("-1", "injection_loops")


def test_int_set_minimum_and_negative_ranges():
    assert parse_int_set("-2-1", "x", minimum=-5) == (-2, -1, 0, 1)
    assert parse_int_set("7,1-2", "layers") == (1, 2, 7)
    with pytest.raises(ValueError, match="'all' is not allowed here"):
        parse_int_set("all", "layers")
