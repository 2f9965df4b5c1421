"""The Huginn-shaped organism trainer (loopalign.organism.huginn) on the organism's data."""

import torch

from loopalign.models.contract import loop_forward, looped_layers, trained_loops
from loopalign.models.huginn import HuginnForCausalLM
from loopalign.organism.config import OrganismConfig
from loopalign.organism.huginn import huginn_organism_config, train_huginn_organism


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
