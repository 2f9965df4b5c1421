"""Configuration of Ouro, ByteDance Seed's looped language model (LoopLM).

Field names follow the released checkpoints (``ByteDance/Ouro-1.4B``, ``-2.6B``), so their
``config.json`` loads unchanged; transformers folds ``rope_theta`` / ``rope_scaling`` into
``rope_parameters`` on load.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

__all__ = ["OuroConfig", "EXIT_MODES"]

#: Readout choices of a forward pass: which loop's state becomes ``logits``.
EXIT_MODES = ("last", "threshold", "expected")


@strict
class OuroConfig(PretrainedConfig):
    """Ouro's configuration: ``num_hidden_layers`` shared decoder layers run ``total_ut_steps``
    times per token, with an exit gate read after every loop. Defaults are Ouro-1.4B's.

    One field is loopalign's own (absent from the released configs; its default reproduces
    the released behaviour): ``exit_mode``, the default readout of a forward pass.
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    default_theta = 1_000_000.0

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    total_ut_steps: int = 4
    early_exit_threshold: float | int = 1.0
    exit_mode: str = "threshold"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._validate_ouro()

    def _validate_ouro(self) -> None:
        if self.total_ut_steps < 1:
            raise ValueError(f"OuroConfig.total_ut_steps must be >= 1, got {self.total_ut_steps}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"OuroConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.exit_mode not in EXIT_MODES:
            raise ValueError(f"OuroConfig.exit_mode must be one of {EXIT_MODES}, got {self.exit_mode!r}")
        if not 0.0 < self.early_exit_threshold <= 1.0:
            raise ValueError(f"OuroConfig.early_exit_threshold must be in (0, 1], got {self.early_exit_threshold}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"OuroConfig.layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.use_sliding_window:
            raise NotImplementedError("OuroConfig.use_sliding_window=True is not supported (Ouro uses full attention)")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise NotImplementedError(f"OuroConfig: rope_type {rope_type!r} is not supported (Ouro uses 'default')")
