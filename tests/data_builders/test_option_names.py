"""The builders take the recipes' option names too (--output_dir, --dataset_limit, --synthetic_levels, --dataset_split,
--data_seed, --model_name_or_path), in either spelling, and read them as their own short names."""

import pytest

from loopalign.data.statements import parser as statements_parser
from loopalign.data.verification import parser as verification_parser
from loopalign.injection.trials import parser as trials_parser

CASES = [
    (
        verification_parser,
        ["--source", "synthetic", "--out", "D", "--n", "7", "--seed", "3", "--levels", "1,2", "--split", "train"],
        ["--source", "synthetic", "--output_dir", "D", "--dataset_limit", "7", "--data_seed", "3",
         "--synthetic_levels", "1,2", "--dataset-split", "train"],
    ),
    (
        statements_parser,
        ["--out", "D", "--seed", "5", "--per-family", "20"],
        ["--output-dir", "D", "--data_seed", "5", "--per_family", "20"],
    ),
    (
        trials_parser,
        ["--model", "tiny", "--out", "D", "--loops", "2"],
        ["--model_name_or_path", "tiny", "--output_dir", "D", "--loops", "2"],
    ),
]  # fmt: skip


@pytest.mark.parametrize("make, short, recipe", CASES, ids=["build-data", "build-statements", "build-injection"])
def test_the_recipes_names_read_as_the_builders_own(make, short, recipe):
    p = make()
    ours, theirs = (vars(p.parse_args(argv)) for argv in (short, recipe))
    assert ours == theirs
    # the names differ in what they set: a changed value shows (the aliases are not ignored)
    changed = [x if x != "D" else "E" for x in recipe]
    assert vars(p.parse_args(changed))["out"] == "E"


@pytest.mark.parametrize("make", [verification_parser, statements_parser, trials_parser])
def test_every_dashed_option_has_its_underscore_spelling_declared(make):
    """Both dialects are declared with each option (no argv rewriting): the help lists them, an unknown one fails."""
    p = make()
    dashed = [s for a in p._actions for s in a.option_strings if s.startswith("--") and "-" in s[2:]]
    names = {s for a in p._actions for s in a.option_strings}
    assert dashed and all("--" + s[2:].replace("-", "_") in names for s in dashed)
    with pytest.raises(SystemExit):
        p.parse_args(["--no_such_option", "1"])
