import pytest
import torch


@pytest.fixture(scope="session")
def tiny(tok):
    """A random tiny Ouro (2 layers x 4 loops) and concept vectors for 4 words at both layers, all loops."""
    from loopalign import OuroForCausalLM, tiny_config
    from loopalign.injection import BASELINE_WORDS, CONCEPT_WORDS, extract_concept_vectors

    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    vectors = extract_concept_vectors(model, tok, CONCEPT_WORDS[:4], BASELINE_WORDS[:12], num_loops=4, layers=[0, 1])
    return model, vectors
