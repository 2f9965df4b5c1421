"""Configuration of Huginn ("raven"), the recurrent-depth language model of Geiping et al. 2025.

Field names follow the released checkpoints (``tomg-group-umd/huginn-0125``, model_type ``huginn_raven``), so
their ``config.json`` loads unchanged and without remote code. Defaults are huginn-0125's (facts in
``docs/families.md``). Informational fields of the released configs (``block_class_name``, ``init_strategy``,
...) are kept as plain attributes and not read.

Three fields are loopalign's own, with defaults that reproduce the released model; they let
:mod:`loopalign.models.retrofit` express a converted Llama in the same model class:
``block_type`` (``"sandwich"``: Huginn's four-norm block; ``"pre_norm"``: Llama's), ``rope_pairs``
(``"adjacent"``: Huginn's (2i, 2i+1) pairs; ``"half"``: rotate-half) and ``norm_before_coda``.
``init_scale`` is the default scale of the random initial state when ``forward`` gets none (1.0 as the
reference; 0.0 gives the deterministic zero state).
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

__all__ = ["HuginnConfig", "BLOCK_TYPES", "ROPE_PAIRS"]

BLOCK_TYPES = ("sandwich", "pre_norm")
ROPE_PAIRS = ("adjacent", "half")


@strict
class HuginnConfig(PretrainedConfig):
    """A prelude of ``n_layers_in_prelude`` blocks, a recurrent block of ``n_layers_in_recurrent_block`` blocks
    iterated ``mean_recurrence`` times by default (the embedding injected every step through ``adapter``), and
    a coda of ``n_layers_in_coda`` blocks.

    Contract names (``docs/models.md``): ``hidden_size`` = ``n_embd``, ``num_attention_heads`` = ``n_heads``,
    ``num_hidden_layers`` = the looped layers per step (``n_layers_in_recurrent_block``), ``total_ut_steps`` =
    the default step count (``mean_recurrence``).
    """

    model_type = "huginn_raven"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers_in_recurrent_block",
        "total_ut_steps": "mean_recurrence",
        "max_position_embeddings": "block_size",
        "rms_norm_eps": "norm_eps",
    }

    n_embd: int = 5280
    n_heads: int = 55
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    n_layers: int = 8
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    intermediate_size: int = 17920
    vocab_size: int = 65536
    padding_multiple: int = 4096
    padded_vocab_size: int | None = None
    block_size: int = 4096
    rope_base: float | int = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    bias: bool = False
    tie_embeddings: bool = True
    tie_word_embeddings: bool | None = None
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    effective_expected_depth: int | None = None
    init_values: dict | None = None
    injection_type: str = "linear"
    state_init: str = "like-init"
    test_time_noise: float | int = 0
    test_time_noise_type: str = "fixed"
    embed_scale: float | None = None
    init_scale: float | int = 1.0
    block_type: str = "sandwich"
    rope_pairs: str = "adjacent"
    norm_before_coda: bool = True
    use_cache: bool = True
    initializer_range: float = 0.02
    # huginn-0125's tokenizer: bos 65504, eos 65505, pad 65509 (its config carries them)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_heads
        if self.padded_vocab_size is None:
            self.padded_vocab_size = math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple
        if self.effective_expected_depth is None:
            self.effective_expected_depth = (
                self.n_layers_in_prelude
                + self.n_layers_in_coda
                + self.n_layers_in_recurrent_block * self.mean_recurrence
            )
        if self.embed_scale is None:
            self.embed_scale = math.sqrt(self.n_embd)
        # the released config.json leaves tie_word_embeddings out: tie_embeddings decides
        self.tie_word_embeddings = self.tie_embeddings
        super().__post_init__(**kwargs)
        self._validate_huginn()

    def _validate_huginn(self) -> None:
        name = "HuginnConfig"
        for field in ("n_layers_in_prelude", "n_layers_in_coda"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")
        for field in ("n_layers_in_recurrent_block", "mean_recurrence", "n_embd", "n_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        total = self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda
        if self.n_layers != total:
            raise ValueError(
                f"{name}.n_layers ({self.n_layers}) must equal n_layers_in_prelude + n_layers_in_recurrent_block + "
                f"n_layers_in_coda ({total})"
            )
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(
                f"{name}.n_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.qk_bias and self.num_key_value_heads != self.n_heads:
            raise ValueError(f"{name}.qk_bias needs num_key_value_heads == n_heads (its k bias has one row per head)")
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"{name}.padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.injection_type != "linear":
            raise NotImplementedError(f"{name}.injection_type {self.injection_type!r}: only 'linear' is supported")
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"{name}.block_type must be one of {BLOCK_TYPES}, got {self.block_type!r}")
        if self.rope_pairs not in ROPE_PAIRS:
            raise ValueError(f"{name}.rope_pairs must be one of {ROPE_PAIRS}, got {self.rope_pairs!r}")
        if self.init_scale < 0:
            raise ValueError(f"{name}.init_scale must be >= 0, got {self.init_scale}")
        if self.test_time_noise:
            raise NotImplementedError(f"{name}.test_time_noise={self.test_time_noise}: only 0 (no noise) is supported")
