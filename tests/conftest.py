import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model_factory():
    from loopalign import OuroForCausalLM, tiny_config

    def make(**overrides):
        torch.manual_seed(0)
        return OuroForCausalLM(tiny_config(**overrides)).eval()

    return make


def pytest_collection_modifyitems(config, items):
    """Tests that need the default model organism run last (stable order otherwise), so that its
    build, which CI starts beside the tests (.ci/run), overlaps everything else."""
    items.sort(key=lambda item: "organism" in getattr(item, "fixturenames", ()))
