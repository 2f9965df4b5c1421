"""[introspection-v3] item 4: nameability (does an injected concept vector make a model say its word?) and the
nameable organism's steering rows and build."""

import json

import pytest
import torch

from loopalign.eval.introspection.nameability import (
    HELD_OUT_NAMEABILITY_PROMPT,
    NAMEABILITY_PROMPTS,
    nameability,
    nameability_prompt,
    names_word,
)
from loopalign.injection import (
    BASELINE_WORDS,
    CONCEPT_WORDS,
    TRIAL_QUESTION,
    extract_concept_vectors,
    residual_site_norms,
    trial_prompt,
)
from loopalign.organism.introspection import IntrospectionOrganismConfig, word_reply
from loopalign.organism.nameable import (
    NameableOrganismConfig,
    ensure_nameable_organism,
    nameable_organism_path,
    steering_rows,
)
from loopalign.tokenizer import local_tokenizer

VOCAB = list(dict.fromkeys([*CONCEPT_WORDS, *BASELINE_WORDS]))
SMALL = NameableOrganismConfig(
    steps=3, batch_size=4, hidden_size=32, intermediate_size=64, steer_steps=4, steer_batch_size=4, steer_refresh=2
)


def test_a_reply_names_the_word_only_when_it_is_the_first_vocabulary_word_named():
    assert names_word("Trumpets.", "Trumpets", VOCAB)
    assert names_word("a trumpet, I think", "Trumpets", VOCAB)  # forms count
    assert not names_word("Towers.", "Trumpets", VOCAB)
    assert not names_word("Towers or trumpets", "Trumpets", VOCAB)  # another word named first
    assert not names_word("........", "Trumpets", VOCAB)


def test_the_neutral_requests_are_not_the_trial_or_a_control_question():
    from loopalign.eval.introspection.trials import CONTROL_QUESTIONS
    from loopalign.trainers.introspection.data import TRAINING_QUESTIONS

    asked = {TRIAL_QUESTION, *CONTROL_QUESTIONS, *TRAINING_QUESTIONS}
    assert not asked & {*NAMEABILITY_PROMPTS, HELD_OUT_NAMEABILITY_PROMPT}
    assert HELD_OUT_NAMEABILITY_PROMPT not in NAMEABILITY_PROMPTS  # read on a request no build trains on


def test_steering_rows_inject_from_the_last_user_turn_and_target_the_word():
    tok = local_tokenizer(1024)
    ids, start, n = steering_rows(tok, "Snow", NAMEABILITY_PROMPTS[0])
    assert start == 0 and tok.decode(ids[n:], skip_special_tokens=True) == "Snow."
    ids2, start2, n2 = steering_rows(
        tok, "Snow", NAMEABILITY_PROMPTS[0], ["Desks", "Milk"], "I am thinking about {word}."
    )
    before = tok.decode(ids2[:start2])
    assert "Tell me about desks" in before and word_reply("Desks") in before and word_reply("Milk") in before
    assert NAMEABILITY_PROMPTS[0] not in before and NAMEABILITY_PROMPTS[0] in tok.decode(ids2[start2:n2])
    assert tok.decode(ids2[n2:], skip_special_tokens=True) == "I am thinking about snow."


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_nameable_organism(SMALL, cache_dir=cache, progress=False)


def test_the_build_is_cached_and_records_held_out_nameability_in_both_contexts(built):
    cache, path = built
    assert path == nameable_organism_path(SMALL, cache) and path.name.startswith("nameable-organism-v3-")
    meta = json.loads((path / "organism.json").read_text())
    assert (
        meta["config"] == json.loads(json.dumps(SMALL.to_dict()))
        and len(json.loads((path / "losses.json").read_text())["steer"]) == 4
    )
    for context in ("neutral", "trial"):
        named = meta["nameability"][context]
        assert named["context"] == context and named["n"] == 12 * len(SMALL.steer_strengths)  # 12 held-out concepts
        assert set(named["by_strength"]) == {"0.5", "1", "2", "4"} and 0.0 <= named["rate"] <= 1.0
        assert named["site"]["loop"] == SMALL.num_loops - 1


def test_the_word_stage_is_the_introspection_organisms():
    """The nameable build trains the introspection organism's word stage with the same fields."""
    assert NameableOrganismConfig().word_stage() == IntrospectionOrganismConfig()
    assert (
        SMALL.word_stage().to_dict()
        == IntrospectionOrganismConfig(steps=3, batch_size=4, hidden_size=32, intermediate_size=64).to_dict()
    )


def test_nameability_injects_norm_matched_at_the_site_in_either_context(built):
    from loopalign.organism.nameable import load_nameable_organism

    cache, _ = built
    model, tok = load_nameable_organism(SMALL, cache_dir=cache)
    words = ["Snow", "Milk"]
    cv = extract_concept_vectors(model, tok, VOCAB, num_loops=4, layers=[0], batch_size=64)
    for context, (ids, start) in (("neutral", nameability_prompt(tok)), ("trial", trial_prompt(tok)[1:])):
        out = nameability(model, tok, cv, words, loop=3, layer=0, strengths=(1.0, 2.0), context=context)
        site = {"input_ids": ids, "injection_start": start, "num_loops": 4, "injection_loop": 3, "layer": 0}
        assert out["site"]["site_norm"] == pytest.approx(residual_site_norms(model, [site])[(4, 3, 0)])
        assert out["n"] == 4 and len(out["examples"]) == 4
    # the injection reaches generation: a vector many times the residual norm changes the greedy reply
    quiet = nameability(model, tok, cv, words, loop=3, layer=0, strengths=(1e-6,), context="neutral")
    loud = nameability(model, tok, cv, words, loop=3, layer=0, strengths=(50.0,), context="neutral")
    assert [e["reply"] for e in quiet["examples"]] != [e["reply"] for e in loud["examples"]]


def test_bad_options_fail_before_generation(built):
    from loopalign.organism.nameable import load_nameable_organism

    cache, _ = built
    model, tok = load_nameable_organism(SMALL, cache_dir=cache)
    cv = extract_concept_vectors(model, tok, ["Snow"], num_loops=4, layers=[0], batch_size=8)
    with pytest.raises(ValueError, match="context"):
        nameability(model, tok, cv, ["Snow"], 3, 0, context="chat")
    with pytest.raises(ValueError, match="strengths"):
        nameability(model, tok, cv, ["Snow"], 3, 0, strengths=(0.0,))
    with pytest.raises(ValueError, match="steer_max_context"):
        NameableOrganismConfig(steer_max_context=-1)
    with pytest.raises(ValueError, match="steer_frames"):
        NameableOrganismConfig(steer_frames=("The thought is about it.",))
    with pytest.raises(ValueError, match="steer_steps"):
        NameableOrganismConfig(steer_steps=0)
    assert torch.is_tensor(cv.vector("Snow", 3, 0))
