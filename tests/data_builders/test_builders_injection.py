import pytest
import torch

from data_builders.injection import (
    BASELINE_WORDS,
    CONCEPT_WORDS,
    ConceptVectors,
    TrialConfig,
    build_trials,
    concept_prompt_ids,
    extract_concept_vectors,
    load_concept_vectors,
    save_concept_vectors,
    trial_prompt,
)
from loopalign.data.schema import validate_records
from loopalign.hooks import capture_activations

CONCEPTS = ("Dust", "Satellites", "Origami")
BASE = ("Desks", "Jackets", "Butterflies", "Butterflies")


def test_published_word_lists():
    assert len(CONCEPT_WORDS) == len(set(CONCEPT_WORDS)) == 50
    assert len(BASELINE_WORDS) == 100 and len(set(BASELINE_WORDS)) == 99
    assert BASELINE_WORDS.count("Butterflies") == 2
    assert (CONCEPT_WORDS[0], CONCEPT_WORDS[-1], BASELINE_WORDS[0], BASELINE_WORDS[-1]) == (
        "Dust",
        "Silver",
        "Desks",
        "Enigmas",
    )
    assert not set(CONCEPT_WORDS) & set(BASELINE_WORDS)


def test_concept_prompt_is_chat_user_turn(tok):
    ids = concept_prompt_ids(tok, "Dust")
    assert tok.decode(ids) == "<|im_start|>user\nTell me about dust<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def vectors(tok, tiny_ouro):
    return extract_concept_vectors(tiny_ouro, tok, CONCEPTS, BASE, num_loops=3, layers=[1, 0], batch_size=2)


def test_vectors_match_hooked_residuals(tok, tiny_ouro, vectors):
    assert set(vectors.vectors) == set(CONCEPTS)
    assert vectors.vectors["Dust"].shape == (3, 2, tiny_ouro.config.hidden_size)
    sites = [(t, layer) for t in range(3) for layer in (1, 0)]

    def last_token(word):
        ids = torch.tensor([concept_prompt_ids(tok, word)])
        with capture_activations(tiny_ouro, sites, positions=[ids.shape[1] - 1]) as cap:
            tiny_ouro(ids, num_loops=3)
        return torch.stack([torch.stack([cap.get(t, layer)[0, 0] for layer in (1, 0)]) for t in range(3)])

    base = torch.stack([last_token(w) for w in BASE]).mean(0)  # duplicate counts twice
    for w in CONCEPTS:
        torch.testing.assert_close(vectors.vectors[w], last_token(w) - base, atol=1e-4, rtol=1e-4)
    uniq = extract_concept_vectors(tiny_ouro, tok, CONCEPTS[:1], BASE, num_loops=3, layers=[1, 0], unique_baseline=True)
    assert not torch.allclose(uniq.vectors["Dust"], vectors.vectors["Dust"])
    assert uniq.metadata["baseline"] == ["Desks", "Jackets", "Butterflies"]


def test_save_load_select(tmp_path, vectors):
    path = tmp_path / "cv.safetensors"
    save_concept_vectors(vectors, path)
    cv = load_concept_vectors(path)
    assert cv.metadata["layers"] == [1, 0] and cv.metadata["num_loops"] == 3
    assert cv.metadata["hidden_size"] == 64 and cv.metadata["template"] == "Tell me about {word}"
    assert list(cv.vectors) == list(CONCEPTS)
    sel = cv.select(2, 0)
    torch.testing.assert_close(sel["Origami"], vectors.vectors["Origami"][2, 1])
    torch.testing.assert_close(cv.vector("Dust", 0, 1), vectors.vectors["Dust"][0, 0])
    with pytest.raises(ValueError, match=r"loop 3 out of range.*0\.\.2"):
        cv.select(3, 0)
    with pytest.raises(ValueError, match=r"layer 5 was not extracted.*\[1, 0\]"):
        cv.select(0, 5)
    with pytest.raises(KeyError, match="Bread"):
        cv.vector("Bread", 0, 0)


def test_extract_argument_errors(tok, tiny_ouro):
    with pytest.raises(ValueError, match="layers"):
        extract_concept_vectors(tiny_ouro, tok, CONCEPTS, BASE, layers=[2])
    with pytest.raises(ValueError, match="distinct"):
        extract_concept_vectors(tiny_ouro, tok, ("Dust", "Dust"), BASE)


def test_trial_prompt(tok):
    prompt, ids, start = trial_prompt(tok)
    assert tok.decode(ids[start:]).startswith("\n\nTrial 1: Do you detect an injected thought?")
    assert not tok.decode(ids[start - 1 :]).startswith("\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nOk.<|im_end|>" in prompt
    assert prompt.count("<|im_start|>user") == 2 and "50% of trials" in prompt


def test_build_trials(tok, vectors):
    cfg = TrialConfig(
        num_loops=3, layers=(1,), concepts=CONCEPTS[:2], injection_loops=(2,), strengths=(2, 4), n_controls=5
    )
    trials = build_trials(tok, cfg, vectors)
    validate_records(trials, kind="trial")
    inj = [t for t in trials if t["injected"]]
    ctl = [t for t in trials if not t["injected"]]
    assert len(inj) == 2 * 3 * 1 * 1 * 2 and len(ctl) == 5
    assert {t["extraction_loop"] for t in inj} == {0, 1, 2} and {t["injection_loop"] for t in inj} == {2}
    assert all(t["trial_type"] == "control" and t["strength"] == 0 for t in ctl)
    assert all(isinstance(t["strength"], float) for t in trials)
    with pytest.raises(ValueError, match="layer 5"):
        build_trials(tok, TrialConfig(num_loops=3, layers=(5,), concepts=CONCEPTS[:1]), vectors)
    with pytest.raises(ValueError, match="out of range"):
        TrialConfig(num_loops=3, layers=(0,), injection_loops=(3,))
    with pytest.raises(ValueError, match="no concept vectors"):
        build_trials(tok, TrialConfig(num_loops=3, layers=(0,), concepts=("Milk",)), vectors)


def test_bad_vector_file(tmp_path):
    bad = ConceptVectors(
        {"Dust": torch.zeros(2, 1, 4)}, {"num_loops": 3, "layers": [0], "hidden_size": 4, "model": "m", "template": "t"}
    )
    save_concept_vectors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="shape"):
        load_concept_vectors(tmp_path / "bad.safetensors")


def test_vectors_hash_survives_roundtrip(tmp_path, vectors):
    from data_builders.injection import vectors_hash

    save_concept_vectors(vectors, tmp_path / "a.safetensors")
    assert vectors_hash(load_concept_vectors(tmp_path / "a.safetensors")) == vectors_hash(vectors)
    other = ConceptVectors({w: v + 1e-3 for w, v in vectors.vectors.items()}, vectors.metadata)
    assert vectors_hash(other) != vectors_hash(vectors)
