import datasets
import pytest


@pytest.fixture(scope="session")
def gap_dataset():
    """48 rendered synthetic verification records (balanced gold / wrong answers), local tokenizer."""
    from data_builders.candidates import controlled_candidates
    from data_builders.prompts import render_records
    from data_builders.sources.synthetic import generate_problems
    from loopalign.tokenizer import local_tokenizer

    tok = local_tokenizer()
    rendered, rejected = render_records(controlled_candidates(generate_problems(24, seed=0, levels=(1,))), tok)
    assert not rejected
    return datasets.Dataset.from_list(rendered), tok
