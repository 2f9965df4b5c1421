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
