"""The Huginn-shaped organism trainer (loopalign.organism.huginn) on the organism's data."""

import json

import pytest
import torch

from loopalign import loading
from loopalign.loading import is_local_model, load_model
from loopalign.models.contract import loop_forward, looped_layers, trained_loops
from loopalign.models.huginn import HuginnForCausalLM
from loopalign.organism import CorruptOrganismError, is_organism_model, organism_config_for
from loopalign.organism.config import OrganismConfig
from loopalign.organism.huginn import (
    ensure_huginn_organism,
    huginn_organism_config,
    huginn_organism_path,
    is_huginn_organism,
    load_huginn_organism,
    train_huginn_organism,
)
from loopalign.scripts import pretrain_organism
from loopalign.scripts.eval_gap import EvalGapScriptArguments


def test_a_few_steps_train_every_step_and_are_deterministic():
    config = OrganismConfig(steps=6, warmup_steps=1, batch_size=16)
    first = train_huginn_organism(config, progress=False)
    model = first.model
    assert isinstance(model, HuginnForCausalLM) and trained_loops(model) == config.num_loops
    assert len(looped_layers(model)) == config.num_layers
    assert model.config.n_layers_in_prelude == 1 and model.config.n_layers_in_coda == 1
    assert len(first.loop_losses) == 6 and len(first.loop_losses[0]) == config.num_loops
    assert first.losses[-1] < first.losses[0] - 1.0, first.losses
    again = train_huginn_organism(config, progress=False)
    assert again.losses == first.losses  # seeded
    ids = torch.randint(3, 100, (2, 8))
    out = loop_forward(model, ids, num_loops=config.num_loops, output_loop_logits=True)
    assert len(out.loop_logits) == config.num_loops


def test_the_shape_follows_the_organism_config():
    config = OrganismConfig(num_layers=3, num_loops=5)
    shape = huginn_organism_config(config, vocab_size=300, prelude=2, coda=0)
    assert (shape.n_layers_in_prelude, shape.n_layers_in_recurrent_block, shape.n_layers_in_coda) == (2, 3, 0)
    assert shape.mean_recurrence == 5 and shape.init_scale == 0.0 and shape.n_embd == config.hidden_size


SMALL = dict(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    num_loops=2,
    steps=8,
    batch_size=8,
    warmup_steps=2,
    eval_problems=12,
    eval_loops="1-2",
)


def test_the_organism_command_builds_caches_and_checks_a_huginn_organism(tmp_path, monkeypatch, capsys):
    """`loopalign organism --family huginn`: built atomically into the cache beside the Ouro organism's folder,
    with its card and marker; reused on the next call; a damaged file is refused naming it; loads as a named model
    and as a folder; the Ouro family does not take it for its own."""
    monkeypatch.setenv("LOOPALIGN_CACHE", str(tmp_path))
    config = OrganismConfig(**SMALL)
    argv = ["--family", "huginn", "--no_progress"] + [arg for k, v in SMALL.items() for arg in (f"--{k}", str(v))]
    assert pretrain_organism.main(argv) == 0
    path = huginn_organism_path(config)
    assert path.parent == tmp_path and path.name.startswith("organism-huginn-v")
    assert is_huginn_organism(path, config) and not list(tmp_path.glob(".tmp-*"))
    meta = json.loads((path / "organism.json").read_text())
    assert meta["family"] == "huginn" and meta["shape"] == {"prelude": 1, "recurrent": 1, "coda": 1}
    assert [row["loop"] for row in meta["eval"]["table"]] == [1, 2]
    card = (path / "README.md").read_text()
    assert "Huginn-shaped model organism" in card and "| loop |" in card
    assert meta["build"] == config.kernel_path() and f"CPU capability {meta['build']['cpu_capability']}" in card
    assert (path / "eval" / "gap.json").is_file()
    out = capsys.readouterr().out
    assert "building the Huginn organism" in out and f"organism: {path}" in out

    stamp = (path / "organism.json").stat().st_mtime_ns
    assert pretrain_organism.main(argv) == 0
    assert "reusing the cached organism" in capsys.readouterr().out
    assert (path / "organism.json").stat().st_mtime_ns == stamp

    model, _ = load_model(str(path), device="cpu")
    named, _ = load_huginn_organism(config)  # what the named model "huginn_organism" loads (for the default config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), named.state_dict().values()))
    assert isinstance(model, HuginnForCausalLM) and trained_loops(model) == 2
    assert is_organism_model(str(path)) and organism_config_for(str(path)) == config

    # the Ouro organism's reuse check does not take the Huginn build for an Ouro one
    assert not pretrain_organism._is_ouro_organism(path, config)

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CorruptOrganismError, match="model.safetensors is truncated.*--family huginn --force"):
        ensure_huginn_organism(config)


def test_a_huginn_organism_is_a_named_model_and_the_family_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPALIGN_CACHE", str(tmp_path))
    assert is_local_model("huginn_organism") and is_organism_model("huginn_organism")
    assert loading.NAMED_MODELS["huginn_organism"] is load_huginn_organism  # what load_model("huginn_organism") calls
    assert not is_organism_model(str(tmp_path))  # a folder without organism.json
    with pytest.raises(SystemExit):
        pretrain_organism.main(["--family", "raven"])
    with pytest.raises(ValueError, match="needs a gap organism as model_name_or_path"):
        EvalGapScriptArguments(model_name_or_path="tiny", dataset="organism")
