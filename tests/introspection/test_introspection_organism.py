"""[introspection-v2] item 5: the introspection organism builds into a hash-keyed cache atomically, is found
again without a rebuild, is checked against its recorded checksums, and fits the trial transcript."""

import json

import pytest

from loopalign.organism import CorruptOrganismError
from loopalign.organism.introspection import (
    IntrospectionOrganismConfig,
    ensure_introspection_organism,
    introspection_organism_path,
    load_introspection_organism,
    word_reply,
)

SMALL = IntrospectionOrganismConfig(steps=3, batch_size=4, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_introspection_organism(SMALL, cache_dir=cache, progress=False)


def test_build_is_cached_by_config_hash_and_reused(built):
    cache, path = built
    assert path == introspection_organism_path(SMALL, cache) and path.name.startswith("introspection-organism-v1-")
    meta = json.loads((path / "organism.json").read_text())
    assert meta["config"] == SMALL.to_dict() and 0.0 <= meta["word_accuracy"] <= 1.0
    assert meta["build"] == SMALL.kernel_path()  # the kernel path, part of the folder's hash
    assert meta["loss_last_20"] < meta["loss_first_20"] + 1.0 and {"config.json", "tokenizer.json"} <= set(
        meta["files"]
    )
    stamp = (path / "organism.json").stat().st_mtime_ns
    assert ensure_introspection_organism(SMALL, cache_dir=cache) == path
    assert (path / "organism.json").stat().st_mtime_ns == stamp  # found, not rebuilt
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # atomic: no temporary folder left
    other = IntrospectionOrganismConfig(steps=4, batch_size=4, hidden_size=32, intermediate_size=64)
    assert introspection_organism_path(other, cache) != path


def test_it_fits_the_trial_transcript_and_answers_in_its_format(built):
    from loopalign.injection import trial_prompt

    cache, _ = built
    model, tok = load_introspection_organism(SMALL, cache_dir=cache)
    _, ids, _ = trial_prompt(tok)
    assert model.config.max_position_embeddings >= len(ids) + 100 and model.config.total_ut_steps == 4
    assert word_reply("Snow") == "Snow. I am thinking about snow."


def test_a_damaged_file_fails_naming_it(built, tmp_path):
    import shutil

    cache, path = built
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    weights = next(p for p in (copy / path.name).iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CorruptOrganismError, match=weights.name):
        ensure_introspection_organism(SMALL, cache_dir=copy)


def test_bad_config_fails_naming_the_field():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        IntrospectionOrganismConfig(max_position_embeddings=256)
    with pytest.raises(ValueError, match="steps"):
        IntrospectionOrganismConfig(steps=0)
