"""Small Ouro configurations for tests, examples and CPU runs."""

from __future__ import annotations

from .configuration_ouro import OuroConfig


def tiny_config(**overrides) -> OuroConfig:
    """A random-init-sized Ouro (2 layers x 4 loops, hidden 64): builds in milliseconds.

    Keyword arguments override any field, e.g. ``tiny_config(num_hidden_layers=3, vocab_size=1024)``.
    """
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=1024,
        total_ut_steps=4,
        early_exit_threshold=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return OuroConfig(**fields)
