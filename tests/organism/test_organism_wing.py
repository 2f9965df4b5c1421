"""[architecture-2] item 4: one organism wing. The four organisms (Ouro, Huginn-shaped, introspection, nameable) are
configurations of one training loop and one build under a lock, named by one hash rule, and registered as named
models by the wing itself (no ``"module:function"`` strings in the floor-0 loader)."""

import json
import subprocess
import sys

import pytest
import torch

from loopalign import loading
from loopalign.models.ouro import OuroForCausalLM
from loopalign.organism import (
    INTROSPECTION_ORGANISM,
    NAMEABLE_ORGANISM,
    OrganismConfig,
    load_huginn_organism,
    load_introspection_organism,
    load_nameable_organism,
    load_organism,
    train_organism,
)
from loopalign.organism.build import ensure_cached_build, write_build
from loopalign.organism.huginn import huginn_organism_path, train_huginn_organism
from loopalign.organism.introspection import IntrospectionOrganismConfig, train_word_stage
from loopalign.organism.train import PartLoss, TrainResult, adamw, train_steps
from loopalign.tokenizer import local_tokenizer

SMALL = OrganismConfig(steps=3, warmup_steps=1, batch_size=8, hidden_size=32, intermediate_size=64)


def test_a_plain_import_of_the_loader_knows_the_four_organisms():
    """In a fresh process, importing only the floor-0 loader registers the wing's organisms (the package's one
    registry edge), each with the wing's own loader."""
    code = (
        "import json; from loopalign.loading import NAMED_MODELS, is_local_model;"
        "print(json.dumps({n: f.__module__ + '.' + f.__name__ for n, f in NAMED_MODELS.items()}));"
        "assert is_local_model('tiny') and not is_local_model('org/name')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "organism": "loopalign.organism.build.load_organism",
        "huginn_organism": "loopalign.organism.huginn.load_huginn_organism",
        "introspection_organism": "loopalign.organism.introspection.load_introspection_organism",
        "nameable_organism": "loopalign.organism.nameable.load_nameable_organism",
    }
    assert loading.NAMED_MODELS == {
        "organism": load_organism,
        "huginn_organism": load_huginn_organism,
        INTROSPECTION_ORGANISM: load_introspection_organism,
        NAMEABLE_ORGANISM: load_nameable_organism,
    }
    assert loading.local_model_names() == (
        "organism",
        "huginn_organism",
        "introspection_organism",
        "nameable_organism",
        "tiny",
    )


def test_a_named_model_is_registered_once():
    loading.register_named_model("organism", load_organism)  # the same loader again: nothing changes
    with pytest.raises(ValueError, match="'organism' is already registered"):
        loading.register_named_model("organism", load_huginn_organism)
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        loading.register_named_model("tiny", load_organism)
    assert loading.NAMED_MODELS["organism"] is load_organism


def test_every_organism_trains_through_the_one_loop_and_reports_per_loop_losses():
    """The same result shape from all three (the introspection organism now reports its per-loop losses too),
    deterministic by seed, and the loss falls."""
    intro = IntrospectionOrganismConfig(steps=3, warmup_steps=1, batch_size=4, hidden_size=32, intermediate_size=64)
    results = {
        "ouro": train_organism(SMALL, progress=False),
        "huginn": train_huginn_organism(SMALL, progress=False),
        "introspection": train_word_stage(intro, progress=False),
    }
    for name, result in results.items():
        assert isinstance(result, TrainResult), name
        assert len(result.losses) == 3 and all(len(row) == 4 for row in result.loop_losses), name
        assert all(torch.isfinite(torch.tensor(result.losses))), name
    assert len(results["ouro"].exit_probs) == 3 and results["huginn"].exit_probs == []  # Huginn has no exit gate
    again = train_word_stage(intro, progress=False)
    assert again.losses == results["introspection"].losses


def test_the_loop_weights_each_part_by_its_mass():
    """Two parts of masses 3 and 1 give the step objective (3 a + b) / 4 and the gradient of that mean."""
    tok = local_tokenizer(SMALL.vocab_size)
    ids = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(0))

    def run(masses):
        torch.manual_seed(0)
        model = OuroForCausalLM(SMALL.model_config(len(tok)))
        parts = [{"input_ids": ids[i : i + 1], "weights": torch.full((6,), float(m))} for i, m in enumerate(masses)]

        def part_loss(part):
            loss = model(part["input_ids"], labels=part["input_ids"], use_cache=False).loss
            return PartLoss(loss, float(part["weights"].sum()), torch.zeros(4))

        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        result = train_steps(
            TrainResult(model=model, tokenizer=tok), optimizer, 1, lambda s: 0.0, lambda s: parts, part_loss,
            1e9, 4, desc="t", progress=False,
        )  # fmt: skip
        return result.losses[0], [p.grad for p in model.parameters()]

    (weighted, _), (single_a, _), (single_b, _) = run([3, 1]), run([1, 0]), run([0, 1])
    assert weighted == pytest.approx(0.75 * single_a + 0.25 * single_b, rel=1e-6)
    assert single_a != pytest.approx(single_b)


def test_the_optimiser_decays_matrices_only():
    model = OuroForCausalLM(SMALL.model_config(300))
    decay, no_decay = adamw(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_every_organism_folder_is_named_by_the_one_hash_rule():
    names = [
        SMALL.folder_name(),
        huginn_organism_path(SMALL, "/c").name,
        IntrospectionOrganismConfig().folder_name(),
    ]
    hashes = [name.rsplit("-", 1)[1] for name in names]
    assert all(len(h) == 10 and int(h, 16) >= 0 for h in hashes), names
    assert hashes[0] == hashes[1]  # Ouro and Huginn organisms of one config sit side by side


def test_a_build_is_atomic_and_records_its_files(tmp_path):
    out = tmp_path / "org"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed"):
        write_build(out, "test organism", broken)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ValueError, match="must record the saved files"):
        write_build(out, "test organism", lambda tmp: {"config": {}})
    assert not out.exists()


def test_a_missing_build_names_its_rebuild_command_without_building(tmp_path):
    built = []
    with pytest.raises(FileNotFoundError, match="no test organism at .*`loopalign organism --force`"):
        ensure_cached_build(
            tmp_path / "org", lambda p: False, built.append, lambda p: None, what="test organism",
            rebuild="loopalign organism --force", build_if_missing=False,
        )  # fmt: skip
    assert built == [] and not (tmp_path / "org").exists()
    with pytest.raises(ValueError, match="lock_timeout must be > 0"):
        ensure_cached_build(
            tmp_path / "org", lambda p: False, built.append, lambda p: None, what="test organism",
            rebuild="x", lock_timeout=0,
        )  # fmt: skip
    assert built == []


def test_a_complete_build_is_checked_and_its_stale_lock_file_removed(tmp_path):
    """Every organism goes through loopalign.io.ensure_built's fast path: a complete build is not rebuilt, a lock file
    a killed process left beside it goes, and the build's files are checked."""
    path = tmp_path / "org"
    path.mkdir()
    (tmp_path / "org.lock").write_text("")
    built, checked = [], []
    assert (
        ensure_cached_build(path, lambda p: True, built.append, checked.append, what="test organism", rebuild="x")
        == path
    )
    assert built == [] and checked == [path] and not (tmp_path / "org.lock").exists()
