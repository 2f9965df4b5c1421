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


@pytest.fixture(scope="session")
def one_loop_features():
    """``make(states [1, 2, N, K, H], labels [N], prefix="r", per=2)`` -> Features of one loop over layers 0 and 1,
    records ``{prefix}{i}`` grouped ``per`` to a task: synthetic hidden states for the readout tests."""
    import numpy as np

    from loopalign.eval.features import Features

    def make(states, labels, prefix: str = "r", per: int = 2):
        n = len(labels)
        return Features(
            ids=[f"{prefix}{i}" for i in range(n)],
            labels=np.asarray(labels, dtype=np.int64),
            groups=[f"{prefix}t{i // per}" for i in range(n)],
            loops=[1],
            layers=[0, 1],
            num_layers=2,
            states=torch.as_tensor(states, dtype=torch.float32),
            verdict_logp=torch.zeros(1, n, 2),
            verdict_valid=torch.ones(1, n, dtype=torch.bool),
            exit_probs=torch.ones(n, 1),
        )

    return make
