"""Every ablation variant is a valid sft-gap command line that sets what its name says (ablate-gap runs each as
``python -m loopalign sft-gap``; a variant whose options no longer parse would fail only after the runs start)."""

import pytest

from loopalign.scripts.ablate_gap import VARIANTS, run_command


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_parses_as_sft_gap_options(variant, parse_sft_gap, tmp_path):
    argv = run_command(variant, 3, tmp_path / "run", ["--max_steps", "5"])
    assert argv[1:4] == ["-m", "loopalign", "sft-gap"]
    script_args, training_args, _ = parse_sft_gap(argv[4:])
    _, settings = VARIANTS[variant]
    assert training_args.seed == 3 and training_args.max_steps == 5
    # the terms on are exactly the variant's (a weight left out keeps its default: lm's is 1)
    on = {name for name, weight in training_args.loss_weights.items() if weight > 0}
    assert on == {name for name, weight in settings["loss_weights"].items() if weight > 0}
    assert training_args.label_fraction == settings.get("label_fraction", 1.0)
    held = settings["heldout_families"].split(",") if "heldout_families" in settings else []
    assert script_args.heldout_family_names() == held
    assert script_args.family_field == settings.get("family_field", "family")


def test_the_lm_free_and_item_transfer_variants_say_what_they_do():
    lm_free, items = VARIANTS["lm_free"][1], VARIANTS["item_transfer"][1]
    assert lm_free["loss_weights"]["lm"] == 0 and lm_free["loss_weights"]["probe_distill"] > 0
    assert 0 < lm_free["label_fraction"] < 1
    assert items["family_field"] == "item" and set(items["heldout_families"].split(",")) == {
        "eggs",
        "marbles",
        "shells",
    }
