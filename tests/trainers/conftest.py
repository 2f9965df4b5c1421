import datasets
import pytest


@pytest.fixture(scope="session")
def gap_dataset():
    """48 rendered synthetic verification records (balanced gold / wrong answers), local tokenizer."""
    from loopalign.data.candidates import controlled_candidates
    from loopalign.data.prompts import render_records
    from loopalign.data.sources.synthetic import generate_problems
    from loopalign.tokenizer import local_tokenizer

    tok = local_tokenizer()
    rendered, rejected = render_records(controlled_candidates(generate_problems(24, seed=0, levels=(1,))), tok)
    assert not rejected
    return datasets.Dataset.from_list(rendered), tok


@pytest.fixture
def sft_gap_script():
    """The body of recipes/sft_gap.py (which only calls its ``main``)."""
    import loopalign.scripts.sft_gap

    return loopalign.scripts.sft_gap


@pytest.fixture
def parse_sft_gap(sft_gap_script):
    """argv -> (script_args, training_args, model_args), parsed as recipes/sft_gap.py parses them."""
    from trl import ModelConfig, TrlParser

    from loopalign.scripts.args import lora_targets_as_names

    def parse(argv):  # as parse_or_exit, but a bad value raises its ValueError (tests match the message)
        parser = TrlParser((sft_gap_script.GapScriptArguments, sft_gap_script.GapSFTConfig, ModelConfig))
        parsed = parser.parse_args_and_config(args=argv)
        for args in parsed:
            lora_targets_as_names(args)
        return parsed

    return parse
