"""Shared fixtures for the data-builder tests: fixture paths, the local tokenizer, a tiny Ouro."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tok():
    from loopalign.tokenizer import local_tokenizer

    return local_tokenizer()


@pytest.fixture(scope="session")
def tiny_ouro(tok):
    from loopalign import OuroForCausalLM, tiny_config

    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
