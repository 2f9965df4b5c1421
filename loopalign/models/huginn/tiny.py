"""Small Huginn configurations for tests, examples and CPU runs."""

from __future__ import annotations

from .configuration_huginn import HuginnConfig


def tiny_huginn_config(**overrides) -> HuginnConfig:
    """A random-init-sized Huginn (prelude 1, recurrent block 2 x 4 steps, coda 1; hidden 64): builds in
    milliseconds. Its initial state is the zero state (``init_scale=0``), so forwards are deterministic.

    Keyword arguments override any field, e.g. ``tiny_huginn_config(vocab_size=1024, mean_recurrence=3)``.
    """
    fields = dict(
        n_embd=64,
        n_heads=4,
        n_layers=4,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        intermediate_size=160,
        vocab_size=512,
        padding_multiple=64,
        block_size=1024,
        mean_recurrence=4,
        mean_backprop_depth=2,
        init_scale=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    if "n_layers" not in overrides:
        fields["n_layers"] = (
            fields["n_layers_in_prelude"] + fields["n_layers_in_recurrent_block"] + fields["n_layers_in_coda"]
        )
    return HuginnConfig(**fields)
