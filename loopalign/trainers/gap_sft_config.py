"""GapSFTConfig: TRL's ``SFTConfig`` plus the loop-aware objective of :class:`~loopalign.trainers.gap_sft.GapSFTTrainer`
(its terms, their weights and where they read); every parameter is documented in the class docstring. The objective
itself is described in :mod:`loopalign.trainers.gap_sft`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trl import SFTConfig

from loopalign.errors import ConfigError
from loopalign.loops import parse_int_set
from loopalign.lora import parse_loop_selection
from loopalign.prefix_cache import check_prefix_cache_family
from loopalign.speed import CHECKPOINT_POLICIES

from .common import default_bf16
from .gap_data import PROBE_POSITIONS

__all__ = ["DISTILL_KINDS", "GapSFTConfig", "LOOP_WEIGHTINGS", "LOSS_KEYS", "PROBES_FILE", "REPLAY_KINDS"]

#: The objective terms and their default weights: verdict supervision on true labels at every loop
#: (``lm``) alone. The jointly trained probe and its consistency pull are off: on the organism they
#: pulled verdicts toward chance (docs/organism.md, the ablation); they stay available by weight.
LOSS_KEYS = {
    "lm": 1.0,
    "probe": 0.0,
    "consistency": 0.0,
    "rr_probe": 0.0,
    "rr_distill": 0.0,
    "gate": 0.0,
    "probe_distill": 0.0,
    "replay": 0.0,
    "layer_verdict": 0.0,
}
LOOP_WEIGHTINGS = ("uniform", "last", "list", "ouro_entropy")
DISTILL_KINDS = ("absolute", "pairwise")
REPLAY_KINDS = ("tokens", "kl")
PROBES_FILE = "loop_probes.safetensors"


@dataclass
class GapSFTConfig(SFTConfig):
    """TRL's SFTConfig plus the gap objectives. Loop indices are 0-based; logged loop counts 1-based."""

    num_loops: int | None = field(
        default=None, metadata={"help": "Loops per forward (default: the model's total_ut_steps)."}
    )
    lora_loops: str = field(default="all", metadata={"help": "Loops the LoRA adapters act on: all | last | >=K | 1,3."})
    loss_weights: dict | str | None = field(
        default=None, metadata={"help": f"Weights of the objective terms (JSON or dict); keys: {sorted(LOSS_KEYS)}."}
    )
    loop_weighting: str = field(default="uniform", metadata={"help": f"Per-loop LM weighting: {LOOP_WEIGHTINGS}."})
    loop_weights: list[float] | None = field(default=None, metadata={"help": "Loop weights for loop_weighting=list."})
    entropy_beta: float = field(default=0.1, metadata={"help": "beta of Ouro's entropy-regularised exit objective."})
    probe_layer: int | None = field(
        default=None,
        metadata={"help": "Layer the probes read: 0..L-1 = after that layer, L = the loop state (default)."},
    )
    probe_position: str = field(default="answer_end", metadata={"help": f"Where probes read: {PROBE_POSITIONS}."})
    probe_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the jointly trained probes."})
    base_probe_l2: float = field(default=1e-2, metadata={"help": "L2 strength of the frozen base probes (rr_probe)."})
    rr_distill_kind: str = field(default="mse", metadata={"help": "rr_distill distance: mse | cosine."})
    distill_folds: int = field(
        default=5, metadata={"help": "Folds of the out-of-fold probe targets of probe_distill (>= 2)."}
    )
    distill_center_field: str | None = field(
        default=None,
        metadata={
            "help": "probe_distill: a record field (or key of its meta), typically the family, whose groups' "
            "unlabelled targets are centred at their median (in logit), so half of each group's unlabelled records "
            "are taught Yes: it assumes each group is balanced, and corrects a target probe whose cut was fitted "
            "on other groups. None: targets as the probe gives them."
        },
    )
    distill_kind: str = field(
        default="absolute",
        metadata={
            "help": "probe_distill's form: 'absolute' (the verdict's P(Yes) pulled to each record's target) or "
            "'pairwise' (RankNet within the groups of distill_center_field: for two records of one group the "
            "verdict learns which is the truer by how much the targets say, and never where the group's Yes/No "
            "cut lies, which is left to the labelled terms). Needs distill_center_field; the targets are still centred "
            "there, which moves a pair's target only where targets saturate (clamped to [1e-4, 1 - 1e-4]) or where "
            "a group mixes labelled and unlabelled records (only the unlabelled ones are centred)."
        },
    )
    label_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of training records whose labels are used (task-grouped); the rest are trained by "
            "probe_distill only, or left out when probe_distill is 0 (the labelled-only baseline)."
        },
    )
    distill_position: str = field(
        default="verdict", metadata={"help": f"Where the probe_distill target probes read: {PROBE_POSITIONS}."}
    )
    verdict_layers: str | None = field(
        default=None,
        metadata={
            "help": "Layers (0-based, e.g. '18,24') whose residual stream at the verdict position, read through the "
            "final norm and LM head, is trained to give the verdict (loss_weights.layer_verdict; plain causal LMs)."
        },
    )
    verdict_yes: str = field(default="Yes", metadata={"help": "One-token verbal verdict for label 1."})
    verdict_no: str = field(default="No", metadata={"help": "One-token verbal verdict for label 0."})
    replay_batch_size: int = field(
        default=16, metadata={"help": "Replay records (the model's own task answers) per step of the replay term."}
    )
    replay_kind: str = field(
        default="tokens",
        metadata={
            "help": "What the replay term matches on the replayed answers: 'tokens' (cross-entropy on the base "
            "model's greedy tokens) or 'kl' (KL(base || model) on its whole next-token distribution, the base being "
            "the model with its adapters off: hard targets sharpen the model's distributions, soft ones do not)."
        },
    )
    lm_chunk_size: int = field(default=2048, metadata={"help": "Tokens per chunk of the per-loop cross-entropy."})
    compile_layers: bool = field(
        default=False, metadata={"help": "torch.compile each decoder layer (loopalign.speed.compile_decoder_layers)."}
    )
    compile_layers_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend of compile_layers."}
    )
    compile_layers_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode of compile_layers (e.g. max-autotune-no-cudagraphs)."}
    )
    prefix_cache: bool = field(
        default=False,
        metadata={
            "help": "Plain causal LMs (Llama, Qwen2, GPT-2) whose lower layers are frozen (LoRA layers_to_transform): "
            "compute the residual stream entering the lowest trained layer once per record (no grad, kept in CPU "
            "memory) and reuse it in every later forward (lm, readout, rr_distill, replay, evaluation), so those "
            "layers are not run again (loopalign.prefix_cache). Needs right-padded batches and no dropout below "
            "the trained layers; a looped model has no frozen prefix and is refused."
        },
    )
    base_cache: bool = field(
        default=False,
        metadata={
            "help": "Keep the frozen base model's outputs that rr_distill (features at the readout site) and "
            "replay_kind='kl' (the replayed answers' hidden states) compare against, once per record (CPU memory), "
            "so a record's base forward runs on its first visit only (loopalign.trainers.base_cache). Exact up to "
            "float32 rounding; refused with dropout in the base. Does nothing without those terms."
        },
    )

    def __post_init__(self):
        self.bf16 = default_bf16(self.bf16)
        if self.ddp_find_unused_parameters is None:
            # every trainable tensor (LoRA, probes) gets a gradient each step; the probes run after
            # the model's forward, where DDP's unused-parameter search would misreport them
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        for option in ("packing", "padding_free"):
            if getattr(self, option, False):
                raise ConfigError(
                    f"GapSFTConfig.{option}=True is not supported: each row holds one record whose verdict and "
                    "probe positions are read per row. Right padding already runs attention without a mask; "
                    "use train_sampling_strategy='group_by_length' to cut padding."
                )
        ckpt = self.activation_checkpointing_kwargs
        if isinstance(ckpt, dict) and "policy" in ckpt and ckpt["policy"] not in CHECKPOINT_POLICIES:
            raise ConfigError(
                f"GapSFTConfig.activation_checkpointing_kwargs['policy'] must be one of {sorted(CHECKPOINT_POLICIES)}, "
                f"got {ckpt['policy']!r}"
            )
        if self.compile_layers and self.torch_compile:
            raise ConfigError("GapSFTConfig: set compile_layers or torch_compile, not both")
        if self.prefix_cache and (self.torch_compile or self.compile_layers):
            raise ConfigError("GapSFTConfig: prefix_cache replaces the lower layers' calls; it runs without compiling")
        # gap features carry extra columns (label, verdict and probe positions) and are prepared here
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        weights = self.loss_weights
        if isinstance(weights, str):
            try:
                weights = json.loads(weights)
            except json.JSONDecodeError as e:
                raise ConfigError(f"GapSFTConfig.loss_weights is not valid JSON: {self.loss_weights!r}") from e
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(LOSS_KEYS))
        if unknown:
            raise ConfigError(
                f"GapSFTConfig.loss_weights: unknown loss key(s) {unknown}; valid keys: {sorted(LOSS_KEYS)}"
            )
        for k, v in weights.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"GapSFTConfig.loss_weights[{k!r}] must be a number >= 0, got {v!r}")
        self.loss_weights = {**LOSS_KEYS, **{k: float(v) for k, v in weights.items()}}
        if self.loss_weights["consistency"] > 0 and self.loss_weights["probe"] == 0:
            raise ConfigError(
                "GapSFTConfig.loss_weights: 'consistency' > 0 needs 'probe' > 0 (the probes must be trained)"
            )
        if self.loop_weighting not in LOOP_WEIGHTINGS:
            raise ConfigError(
                f"GapSFTConfig.loop_weighting must be one of {LOOP_WEIGHTINGS}, got {self.loop_weighting!r}"
            )
        if self.loop_weighting == "list" and not self.loop_weights:
            raise ConfigError("GapSFTConfig.loop_weighting='list' needs loop_weights")
        if self.loop_weights is not None and any(w < 0 for w in self.loop_weights):
            raise ConfigError(f"GapSFTConfig.loop_weights must be >= 0, got {self.loop_weights}")
        if self.num_loops is not None and self.num_loops < 1:
            raise ConfigError(f"GapSFTConfig.num_loops must be >= 1, got {self.num_loops}")
        if self.probe_position not in PROBE_POSITIONS:
            raise ConfigError(
                f"GapSFTConfig.probe_position must be one of {PROBE_POSITIONS}, got {self.probe_position!r}"
            )
        if self.distill_position not in PROBE_POSITIONS:
            raise ConfigError(
                f"GapSFTConfig.distill_position must be one of {PROBE_POSITIONS}, got {self.distill_position!r}"
            )
        if (self.verdict_layers is None) != (self.loss_weights["layer_verdict"] == 0):
            raise ConfigError(
                "GapSFTConfig: verdict_layers and loss_weights.layer_verdict > 0 go together (the layers the term reads, "
                f"and its weight); got verdict_layers={self.verdict_layers!r}, layer_verdict="
                f"{self.loss_weights['layer_verdict']}"
            )
        if self.verdict_layers is not None:
            parse_int_set(self.verdict_layers, "GapSFTConfig.verdict_layers", what="0-based layer indices")
        if isinstance(self.distill_folds, bool) or not isinstance(self.distill_folds, int) or self.distill_folds < 2:
            raise ConfigError(f"GapSFTConfig.distill_folds must be an int >= 2, got {self.distill_folds!r}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"GapSFTConfig.label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.distill_center_field is not None and self.loss_weights["probe_distill"] <= 0:
            raise ConfigError(
                "GapSFTConfig.distill_center_field centres the probe_distill targets: it needs "
                "loss_weights.probe_distill > 0 (without probe_distill, clear it: --distill_center_field none)"
            )
        if self.distill_kind not in DISTILL_KINDS:
            raise ConfigError(f"GapSFTConfig.distill_kind must be one of {DISTILL_KINDS}, got {self.distill_kind!r}")
        if self.distill_kind == "pairwise" and self.distill_center_field is None:
            raise ConfigError(
                "GapSFTConfig.distill_kind='pairwise' compares records within groups: set distill_center_field "
                "(e.g. 'family')"
            )
        if self.replay_kind not in REPLAY_KINDS:
            raise ConfigError(f"GapSFTConfig.replay_kind must be one of {REPLAY_KINDS}, got {self.replay_kind!r}")
        if self.rr_distill_kind not in ("mse", "cosine"):
            raise ConfigError(f"GapSFTConfig.rr_distill_kind must be 'mse' or 'cosine', got {self.rr_distill_kind!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"GapSFTConfig.learning_rate must be > 0, got {self.learning_rate}")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "replay_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"GapSFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.entropy_beta < 0 or self.probe_learning_rate <= 0 or self.lm_chunk_size < 1:
            raise ConfigError(
                "GapSFTConfig: entropy_beta >= 0, probe_learning_rate > 0 and lm_chunk_size >= 1 required"
            )
        try:
            parse_loop_selection(self.lora_loops)
        except ValueError as e:
            raise ConfigError(f"GapSFTConfig.lora_loops={self.lora_loops!r}: {e}") from None

    def base_reading_terms(self) -> list[str]:
        """The objective terms that compare the model with its base (the model with its adapters switched off), so
        need a PEFT model: ``rr_distill``, and ``replay`` with ``replay_kind='kl'``."""
        terms = ["loss_weights.rr_distill"] if self.loss_weights["rr_distill"] > 0 else []
        if self.loss_weights["replay"] > 0 and self.replay_kind == "kl":
            terms.append("replay_kind='kl'")
        return terms

    def check_against_model(self, model_config) -> tuple[int, int]:
        """Validate loop/layer options against a model config; returns (num_loops, probe_layer).

        A plain causal LM (no ``total_ut_steps``) is a model with one loop: ``num_loops`` must then be 1 (or unset)
        and ``lora_loops`` "all"; ``probe_layer`` picks the layer its readout terms read."""
        depth = getattr(model_config, "total_ut_steps", None)
        num_layers = getattr(model_config, "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError(f"{type(model_config).__name__} names no num_hidden_layers: see docs/models.md")
        if depth is None:  # a plain causal LM: one loop
            if self.num_loops not in (None, 1):
                raise ValueError(
                    f"GapSFTConfig.num_loops={self.num_loops}: {type(model_config).__name__} is not a looped model "
                    "(it runs one loop); leave num_loops unset or 1"
                )
            if self.lora_loops != "all":
                raise ValueError(
                    f"GapSFTConfig.lora_loops={self.lora_loops!r}: {type(model_config).__name__} is not a looped model "
                    "(it runs one loop); use lora_loops='all'"
                )
            if self.loss_weights.get("gate", 0) > 0 or self.loop_weighting == "ouro_entropy":
                raise ValueError(
                    "GapSFTConfig: the 'gate' loss and loop_weighting='ouro_entropy' need a model with an exit gate "
                    f"(Ouro); {type(model_config).__name__} has none"
                )
        if self.prefix_cache:
            check_prefix_cache_family(model_config)  # a looped model or an unsupported family, by name
        num_loops = self.num_loops or int(depth or 1)
        if self.verdict_layers is not None:
            if depth is not None:
                raise ValueError(
                    "GapSFTConfig.verdict_layers is for plain causal LMs (a logit lens on their layers); a looped "
                    "model supervises its verdict per loop (loop_weighting)"
                )
            parse_int_set(self.verdict_layers, "GapSFTConfig.verdict_layers", maximum=num_layers)  # each < L
        layer = num_layers if self.probe_layer is None else self.probe_layer
        if not 0 <= layer <= num_layers:
            raise ValueError(
                f"GapSFTConfig.probe_layer={self.probe_layer} is out of range: 0..{num_layers - 1} (after a layer) "
                f"or {num_layers} (the loop state) for a model with {num_layers} layers"
            )
        if self.loop_weights is not None and len(self.loop_weights) != num_loops:
            raise ValueError(
                f"GapSFTConfig.loop_weights has {len(self.loop_weights)} entries for num_loops={num_loops}"
            )
        try:
            parse_loop_selection(self.lora_loops, max_loops=num_loops)
        except ValueError as e:
            raise ValueError(f"GapSFTConfig.lora_loops={self.lora_loops!r}: {e}") from None
        return num_loops, layer
