import pytest
import torch

from loopalign import OuroForCausalLM, tiny_config
from loopalign.data.candidates import controlled_candidates
from loopalign.data.prompts import render_records
from loopalign.data.sources.synthetic import generate_problems


@pytest.fixture(scope="session")
def tiny_model(tok):
    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()


@pytest.fixture(scope="session")
def synthetic_rows(tok):
    """48 rendered verification records from data_builders: 24 synthetic problems, gold + one wrong answer each."""
    rows, rejected = render_records(controlled_candidates(generate_problems(24, seed=0, levels=(1, 2))), tok)
    assert not rejected and len(rows) == 48
    return rows
