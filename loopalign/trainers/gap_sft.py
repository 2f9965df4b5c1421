"""GapSFTTrainer: LoRA on a looped model so that the verbal verdict (SV) catches up with the
representation readout (RR), per loop, without RR degrading.

One forward pass per batch runs all loops; from it come
- ``lm``: per-loop deep supervision on the target verdict tokens (loop weighting: uniform, last,
  a list, or Ouro's entropy-regularised exit objective), optionally Ouro's stage-II ``gate`` loss;
- ``probe``: a logistic probe per loop at ``probe_layer``, reading the record's probe position,
  trained on the verifier label (on detached features: it measures, it does not reshape);
- ``consistency``: the verbal Yes/No distribution of each loop pulled toward its probe's posterior;
- ``rr_probe``: probes fit on the base model before training stay frozen; their loss on the tuned
  features is penalised;
- ``rr_distill``: tuned features at the readout sites pulled toward the base model's (adapters off);
- ``probe_distill``: the verbal Yes/No distribution of each loop pulled toward FIXED targets, the
  out-of-fold posteriors of per-loop probes fit once on the base model at the site the evaluation
  reads as RR (``fit_probe_targets``, before training). With ``label_fraction`` < 1 only a
  task-grouped share of the records keeps its label; the rest are trained by this term alone, and
  every label-reading term and metric (lm, probe, rr_probe, sv/rr) sees the labelled records only.
- ``layer_verdict`` (plain causal LMs): the Yes/No verdict read at each of ``verdict_layers`` through the model's
  final norm and LM head (a logit lens), trained on the labels: the one-loop analogue of per-loop deep supervision;
- ``replay``: per-loop LM loss on the model's own answers to the training tasks (a separate small
  batch each step from ``replay_dataset``, see :mod:`loopalign.trainers.replay`), so training the
  verdict does not teach the model to answer everything with it (TP is kept).
Each term has a weight in ``GapSFTConfig.loss_weights`` and is logged per loop
(``loss/loop_t``, ``sv/loop_t`` and, with the joint probes, ``probe_acc/loop_t`` and
``probe_gap/loop_t`` with t = loop count 1..T: training-batch figures at the training probe site,
named apart from the evaluation's RR and gap, which read the evaluation's site on held-out records).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from trl import SFTConfig, SFTTrainer

from loopalign.errors import ConfigError
from loopalign.eval.families import record_families
from loopalign.hooks import capture_activations
from loopalign.io import apply_umask_tree, atomic_save_safetensors, atomic_write_text
from loopalign.loading import GAP_CONFIG_FILE
from loopalign.log import get_logger
from loopalign.loops import gather_positions, loop_logits, parse_int_set
from loopalign.lora import parse_loop_selection, route_lora_by_loop, skip_lora_input_upcast
from loopalign.models.contract import final_norm, is_looped, loop_forward
from loopalign.objectives import (
    LoopProbes,
    consistency_loss,
    frozen_probe_loss,
    hidden_distillation_loss,
    ouro_entropy_objective,
    ouro_gate_loss,
    per_loop_token_losses,
    probe_distillation_loss,
    probe_loss,
    probe_ranking_distillation_loss,
    verbal_log_probs,
    weighted_loop_loss,
)
from loopalign.prefix_cache import PrefixCache, check_prefix_cache_family
from loopalign.probes import fit_probes
from loopalign.speed import CHECKPOINT_POLICIES, compile_decoder_layers

from .common import AtomicCheckpointMixin, default_bf16, model_and_tokenizer
from .gap_data import PROBE_POSITIONS, GapCollator, build_gap_features, verdict_token_ids, with_distill_groups
from .probe_targets import fit_probe_targets, labelled_only
from .replay import collate_replay, replay_features

logger = get_logger(__name__)

__all__ = ["GapSFTConfig", "GapSFTTrainer", "LOSS_KEYS", "LOOP_WEIGHTINGS"]

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
                "loss_weights.probe_distill > 0"
            )
        if self.distill_kind not in DISTILL_KINDS:
            raise ConfigError(f"GapSFTConfig.distill_kind must be one of {DISTILL_KINDS}, got {self.distill_kind!r}")
        if self.distill_kind == "pairwise" and self.distill_center_field is None:
            raise ConfigError(
                "GapSFTConfig.distill_kind='pairwise' compares records within groups: set distill_center_field "
                "(e.g. 'family')"
            )
        if self.rr_distill_kind not in ("mse", "cosine"):
            raise ConfigError(f"GapSFTConfig.rr_distill_kind must be 'mse' or 'cosine', got {self.rr_distill_kind!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"GapSFTConfig.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
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


class GapSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """SFTTrainer with per-loop gap objectives (see the module doc). Takes rendered verification
    records (``data_builders``) as ``train_dataset`` / ``eval_dataset``."""

    _tag_names = ["trl", "sft", "loopalign", "gap-sft"]

    def __init__(
        self,
        model,
        args: GapSFTConfig,
        train_dataset,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        base_probes: list | None = None,
        replay_dataset=None,
        **kwargs,
    ):
        if not isinstance(args, GapSFTConfig):
            raise TypeError(f"GapSFTTrainer needs a GapSFTConfig, got {type(args).__name__}")
        model, processing_class = model_and_tokenizer(model, processing_class, args.model_init_kwargs)
        self.num_loops, self.probe_layer = args.check_against_model(model.config)
        #: layers whose logit-lens verdict the layer_verdict term trains (plain causal LMs), ascending
        self.verdict_layer_indices = (
            list(parse_int_set(args.verdict_layers, "GapSFTConfig.verdict_layers")) if args.verdict_layers else []
        )
        self.yes_id, self.no_id = verdict_token_ids(
            processing_class, args.verdict_yes, args.verdict_no, option="GapSFTConfig.verdict_yes / verdict_no"
        )
        feature_kwargs = dict(
            probe_position=args.probe_position,
            yes=args.verdict_yes,
            no=args.verdict_no,
            max_length=args.max_length,
            completion_only=args.completion_only_loss is not False,
        )
        if args.label_fraction < 1.0 and args.loss_weights["probe_distill"] == 0:
            train_dataset = labelled_only(train_dataset, args.label_fraction, args.seed)
        features = build_gap_features(train_dataset, processing_class, **feature_kwargs)
        eval_features = None
        if eval_dataset is not None:
            eval_features = build_gap_features(eval_dataset, processing_class, **feature_kwargs)
        super().__init__(
            model=model,
            args=args,
            train_dataset=features,
            eval_dataset=eval_features,
            processing_class=processing_class,
            data_collator=GapCollator(processing_class.pad_token_id),
            peft_config=peft_config,
            **kwargs,
        )
        # the loss is averaged inside compute_loss; let the Trainer divide by accumulation steps
        self.model_accepts_loss_kwargs = False
        self.weights = dict(args.loss_weights)
        if self.weights["rr_distill"] > 0 and not hasattr(self.model, "disable_adapter"):
            raise ValueError("loss_weights.rr_distill needs a PEFT model (the base = adapters disabled)")
        #: the frozen probe targets' quality (``ProbeTargets.summary()``) when fitted here
        self.probe_targets_summary = None
        if self.weights["probe_distill"] > 0:
            features = self._with_probe_targets(train_dataset, feature_kwargs)
            self.train_dataset = features
        if args.lora_loops != "all":
            route_lora_by_loop(self.model, args.lora_loops)
        skip_lora_input_upcast(self.model)  # under autocast only, where bit-identical (loopalign.lora)
        #: the frozen lower layers' states per record (GapSFTConfig.prefix_cache), filled as records are first seen
        self.prefix_cache = None
        if args.prefix_cache:
            readout = [self.probe_layer] if self.probe_layer < model.config.num_hidden_layers else []
            readout = sorted(set(readout) | set(self.verdict_layer_indices))  # the logit-lens layers read too
            self.prefix_cache = PrefixCache(self.model, readout_layers=readout)
        if args.compile_layers:
            compile_decoder_layers(self.model, backend=args.compile_layers_backend, mode=args.compile_layers_mode)
        device = next(self.model.parameters()).device
        hidden = model.config.hidden_size
        if self.weights["probe"] > 0:
            # a submodule of the trained model: optimizer, DDP gradient sync and device moves cover it
            self.model.loop_probes = LoopProbes(self.num_loops, hidden).to(device)
        self.base_probes = base_probes
        # task replay (loopalign.trainers.replay): the model's own answers, trained beside the verdict
        self.replay_features = None
        if (replay_dataset is not None) != (self.weights["replay"] > 0):
            raise ValueError(
                "GapSFTTrainer: loss_weights['replay'] > 0 needs a replay_dataset (self_replay_dataset), and a "
                "replay_dataset needs loss_weights['replay'] > 0"
            )
        if replay_dataset is not None:
            self.replay_features = replay_features(replay_dataset, args.max_length)
        if args.replay_batch_size < 1:
            raise ValueError(f"GapSFTConfig.replay_batch_size must be >= 1, got {args.replay_batch_size}")
        if self.weights["rr_probe"] > 0 and self.base_probes is None:
            self.base_probes = self.fit_base_probes(features)
        if self.base_probes is not None and len(self.base_probes) != self.num_loops:
            raise ValueError(f"base_probes has {len(self.base_probes)} probes for num_loops={self.num_loops}")

    # ----- features -------------------------------------------------------------------------
    def _with_probe_targets(self, train_dataset, feature_kwargs: dict):
        """Training features with ``probe_target`` / ``labelled``: the dataset's own, or fitted on
        the base model now (``fit_probe_targets``; the model is on its training device here)."""
        args = self.args
        # each record's group (centring and the pairwise form): read once; fitting the targets keeps the record order
        groups = (
            None if args.distill_center_field is None else record_families(train_dataset, args.distill_center_field)
        )
        if "probe_target" not in train_dataset.column_names:
            targets = fit_probe_targets(
                self.model,
                self.processing_class,
                train_dataset,
                self.num_loops,
                layer=self.probe_layer,
                position=args.distill_position,
                n_folds=args.distill_folds,
                label_fraction=args.label_fraction,
                seed=args.seed,
                batch_size=args.per_device_eval_batch_size,
                verdict_tokens=(args.verdict_yes, args.verdict_no),
                center_groups=groups,
            )
            self.probe_targets_summary = targets.summary()
            if self.is_world_process_zero():
                auroc = ", ".join(f"{a:.3f}" for a in targets.oof_auroc)
                logger.info(
                    f"probe_distill targets: {targets.n_labelled}/{targets.n_records} records labelled; "
                    f"probe OOF AUROC per loop (1..{self.num_loops}): {auroc}"
                )
            train_dataset = targets.dataset
        elif args.label_fraction < 1.0 and "labelled" not in train_dataset.column_names:
            raise ValueError(
                f"GapSFTConfig.label_fraction={args.label_fraction}: the train dataset already carries 'probe_target' "
                "but no 'labelled' column, so its targets were fit on every label; refit them with "
                "fit_probe_targets(label_fraction=...) or drop the column"
            )
        if args.distill_kind == "pairwise":
            train_dataset = with_distill_groups(train_dataset, groups)
        lengths = {len(t) for t in train_dataset["probe_target"]}
        if lengths != {self.num_loops}:
            raise ValueError(
                f"the train dataset's 'probe_target' has {sorted(lengths)} entries per record for "
                f"num_loops={self.num_loops}"
            )
        return build_gap_features(train_dataset, self.processing_class, **feature_kwargs)

    def _loop_forward(self, model, input_ids, attention_mask):
        """All loops in one forward -> an output with ``loop_hidden_states`` (T x [B,S,H]); a looped model also
        gives ``exit_probs`` / ``gate_logits``; a plain causal LM is its one loop (:func:`loop_forward`)."""
        if is_looped(model):
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_loops=self.num_loops,
                output_loop_states=True,
                use_cache=False,
                exit="last",
                logits_to_keep=1,
            )
        return loop_forward(model, input_ids, attention_mask, num_loops=1, logits_to_keep=1)

    def _prefix_states(self, model, input_ids, attention_mask):
        """Inside: one forward of this batch runs on the cached lower-layer states (GapSFTConfig.prefix_cache)."""
        if self.prefix_cache is None:
            return nullcontext()
        return self.prefix_cache.substitute(model, input_ids, attention_mask)

    def _readout_features(self, model, inputs, detach: bool, lens_layers=()):
        """One forward of all loops -> (output, features [T,B,H] at probe_layer, the capture of the residual stream at
        ``lens_layers`` at the verdict position (kept in the graph; None without lens layers))."""
        num_layers = self.model.config.num_hidden_layers
        positions = inputs["probe_index"][:, None]
        sites = [(t, self.probe_layer) for t in range(self.num_loops)] if self.probe_layer < num_layers else [(0, 0)]
        # the prefix cache fills before the capture hooks go on, so they see only this forward
        lens = (
            capture_activations(
                model, [(0, i) for i in lens_layers], positions=inputs["verdict_index"][:, None], detach=False
            )
            if lens_layers
            else contextlib.nullcontext()
        )
        with (
            self._prefix_states(model, inputs["input_ids"], inputs["attention_mask"]),
            capture_activations(model, sites, positions=positions, detach=detach) as cap,
            lens as lens_cap,
        ):
            out = self._loop_forward(model, inputs["input_ids"], inputs["attention_mask"])
        if self.probe_layer == num_layers:
            feats = [gather_positions(h, positions)[:, 0] for h in out.loop_hidden_states]
            feats = [f.detach() for f in feats] if detach else feats
        else:
            feats = [cap.get(t, self.probe_layer)[:, 0] for t in range(self.num_loops)]
        return out, torch.stack(feats), lens_cap

    @torch.no_grad()
    def fit_base_probes(self, features) -> list:
        """Fit one L2 logistic probe per loop on the base model's (adapters disabled) features of the
        training set's labelled records; they stay frozen for the rr_probe term."""
        model = self.model
        collate = GapCollator(self.processing_class.pad_token_id)
        device = next(model.parameters()).device
        disable = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.enable_grad()
        xs, ys = [], []
        was_training = model.training
        model.eval()
        # fit on the features of the forward training runs: under autocast with bf16 mixed precision
        with disable, self.accelerator.autocast():
            for start in range(0, len(features), self.args.per_device_eval_batch_size):
                rows = [
                    features[i] for i in range(start, min(start + self.args.per_device_eval_batch_size, len(features)))
                ]
                batch = {k: v.to(device) for k, v in collate(rows).items()}
                _, feats, _ = self._readout_features(model, batch, detach=True)
                keep = batch["labelled"].cpu()  # records without a label stay out of the fit
                xs.append(feats.float().cpu()[:, keep])
                ys.append(batch["label"].cpu()[keep])
        model.train(was_training)
        x, y = torch.cat(xs, dim=1), torch.cat(ys)
        return [fit_probes(x[t], y, [self.args.base_probe_l2])[0] for t in range(self.num_loops)]

    # ----- loss -----------------------------------------------------------------------------
    def _loop_weights(self, device) -> torch.Tensor:
        T = self.num_loops
        kind = self.args.loop_weighting
        if kind == "last":
            w = torch.zeros(T)
            w[-1] = 1.0
        elif kind == "list":
            w = torch.tensor(self.args.loop_weights, dtype=torch.float32)
        else:
            w = torch.full((T,), 1.0 / T)
        return w.to(device)

    def _logs_this_step(self, model) -> bool:
        """True in evaluation, and in training on a step whose metrics the Trainer will log."""
        if not model.training or self.args.logging_strategy != "steps":
            return True
        every = self.args.logging_steps
        if every < 1:  # a ratio of the total steps, turned into a count by Trainer.train
            every = self.state.logging_steps if self.state.logging_steps >= 1 else 1
        every = max(1, int(every))
        step = self.state.global_step  # the optimizer step this batch belongs to, 0-based
        return (step + 1) % every == 0 or (step == 0 and self.args.logging_first_step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Mixed precision: accelerate runs the model's forward under autocast and hands its outputs
        # back in float32 (convert_outputs_to_fp32), but the Trainer calls compute_loss outside
        # autocast. The loss code (a head matmul per loop) runs under the same autocast, so it works
        # in the compute dtype; the objectives cast to the head's dtype and reduce in float32, and
        # the probes run in float32 (autocast off inside them).
        with self.accelerator.autocast():
            return self._gap_loss(model, inputs, return_outputs)

    def _gap_loss(self, model, inputs, return_outputs: bool):
        mode = "train" if model.training else "eval"
        w = self.weights
        needs_grad_features = w["rr_probe"] > 0 or w["rr_distill"] > 0
        lens_layers = self.verdict_layer_indices if w["layer_verdict"] > 0 else []
        out, feats, lens_cap = self._readout_features(
            model, inputs, detach=not needs_grad_features, lens_layers=lens_layers
        )
        unwrapped = self.accelerator.unwrap_model(model)
        lm_head = unwrapped.get_output_embeddings()
        loop_w = self._loop_weights(feats.device)
        labels = inputs["label"]
        # records whose label may be read (label_fraction < 1: the others carry label -1)
        labelled = inputs["labelled"] if "labelled" in inputs else torch.ones_like(labels, dtype=torch.bool)
        mask = labelled.float()
        terms: dict[str, torch.Tensor] = {}
        per_loop: dict[str, torch.Tensor] = {}

        # Loops that no LM term weights are only logged: scored without autograd, and only on steps
        # that log (in training), so a last-loop-only run pays for one readout on the others.
        if w["lm"] > 0 and self.args.loop_weighting == "ouro_entropy":
            grad_loops = [True] * self.num_loops
        else:
            grad_loops = ((loop_w > 0) & (w["lm"] > 0)).tolist()
        log_all = w["gate"] > 0 or self._logs_this_step(model)
        score_loops = [g or log_all for g in grad_loops]
        token_losses, index = per_loop_token_losses(
            lm_head,
            out.loop_hidden_states,
            inputs["labels"],
            self.args.lm_chunk_size,
            grad_loops=grad_loops,
            score_loops=score_loops,
        )
        per_loop["loss"] = (
            token_losses.mean(dim=1).detach() if token_losses.shape[1] else token_losses.new_zeros(self.num_loops)
        )
        per_loop["loss"][~torch.tensor(score_loops, device=per_loop["loss"].device)] = float("nan")
        if w["lm"] > 0:
            if self.args.loop_weighting == "ouro_entropy":
                exit_probs = out.exit_probs.reshape(-1, self.num_loops)[index]
                terms["lm"], _ = ouro_entropy_objective(token_losses, exit_probs, self.args.entropy_beta)
            else:
                terms["lm"], _ = weighted_loop_loss(token_losses, loop_w)
        if w["replay"] > 0 and model.training:
            terms["replay"], per_loop["replay"] = self._replay_loss(model, lm_head, loop_w)
        if w["gate"] > 0:
            gates = torch.stack(out.gate_logits, dim=-1).reshape(-1, self.num_loops)[index]
            terms["gate"] = ouro_gate_loss(token_losses, gates)

        if lens_cap is not None:  # the verdict at earlier layers, read through the final norm and head (logit lens)
            norm = final_norm(unwrapped)
            states = torch.stack([lens_cap.get(0, i)[:, 0] for i in lens_layers])  # [K,B,H]
            lens_logits = lm_head(norm(states.to(lm_head.weight.dtype)))  # [K,B,V]
            log_yes = verbal_log_probs(lens_logits, self.yes_id, self.no_id)  # [K,B]
            log_no = torch.log1p(-log_yes.exp().clamp(max=1 - 1e-6))
            y = labels.clamp(min=0).float()
            nll = -(y * log_yes + (1 - y) * log_no)  # [K,B]
            per_layer = (nll * mask).sum(dim=1) / mask.sum().clamp(min=1)
            terms["layer_verdict"] = per_layer.mean()
            for k, i in enumerate(lens_layers):
                self._metrics[mode][f"layer_verdict/layer_{i}"].append(per_layer[k].detach().item())
        verdict_logits = loop_logits(lm_head, out.loop_hidden_states, inputs["verdict_index"][:, None])[:, :, 0]
        p_yes = verbal_log_probs(verdict_logits.detach(), self.yes_id, self.no_id).exp()  # [T,B]
        # metrics over the labelled records (NaN, not logged, when a batch has none)
        per_loop["sv"] = (((p_yes > 0.5).long() == labels).float() * mask).sum(dim=1) / mask.sum()
        probes = getattr(unwrapped, "loop_probes", None)
        if probes is not None:
            probe_logits = probes(feats.detach())
            hits = ((probe_logits.detach() > 0).long() == labels).float()
            per_loop["probe_acc"] = (hits * mask).sum(dim=1) / mask.sum()
            per_loop["probe_gap"] = per_loop["probe_acc"] - per_loop["sv"]
            if w["probe"] > 0:
                per_loop["probe_loss"] = probe_loss(probe_logits, labels, mask)
                terms["probe"] = (loop_w * per_loop["probe_loss"]).sum()
            if w["consistency"] > 0:
                per_loop["consistency"] = consistency_loss(verdict_logits, probe_logits, self.yes_id, self.no_id)
                terms["consistency"] = (loop_w * per_loop["consistency"]).sum()
        if w["rr_probe"] > 0:
            per_loop["rr_probe"] = frozen_probe_loss(self.base_probes, feats, labels, mask)
            terms["rr_probe"] = (loop_w * per_loop["rr_probe"]).sum()
        if w["rr_distill"] > 0:
            with torch.no_grad(), unwrapped.disable_adapter():
                _, base_feats, _ = self._readout_features(model, inputs, detach=True)
            per_loop["rr_distill"] = hidden_distillation_loss(feats, base_feats, self.args.rr_distill_kind)
            terms["rr_distill"] = (loop_w * per_loop["rr_distill"]).sum()
        # over ALL records: the targets are fixed probe posteriors, no label is read here. An eval
        # set without targets (they are fitted for the train set) skips the term.
        if w["probe_distill"] > 0 and "probe_target" in inputs:
            targets = inputs["probe_target"].T  # [T,B]
            if self.args.distill_kind == "pairwise":
                per_loop["probe_distill"] = probe_ranking_distillation_loss(
                    verdict_logits, targets, inputs["distill_group"], self.yes_id, self.no_id
                )
            else:
                per_loop["probe_distill"] = probe_distillation_loss(verdict_logits, targets, self.yes_id, self.no_id)
            terms["probe_distill"] = (loop_w * per_loop["probe_distill"]).sum()

        loss = sum(w[k] * v for k, v in terms.items()) if terms else feats.sum() * 0.0
        if torch.is_grad_enabled() and not loss.requires_grad:  # e.g. lm only on a batch without labels
            loss = loss + verdict_logits.float().sum() * 0.0
        metrics = self._metrics[mode]
        for k, v in terms.items():
            metrics[f"{k}_loss"].append(self.accelerator.gather_for_metrics(v.detach()).mean().item())
        for name, values in per_loop.items():
            values = self.accelerator.gather_for_metrics(values.detach()[None]).nanmean(0)
            for t, value in enumerate(values.tolist()):
                if not math.isnan(value):  # a loop not scored this step
                    metrics[f"{name}/loop_{t + 1}"].append(value)
        return (loss, out) if return_outputs else loss

    def _replay_loss(self, model, lm_head, loop_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The replay term on this step's replay batch: per-loop LM loss on the model's own answers,
        weighted over loops like ``lm``. -> (term, per-loop loss [T]). The batch is drawn by
        (seed, global step, process), so a resumed run draws the same ones."""
        n = len(self.replay_features)
        gen = torch.Generator().manual_seed(
            (self.args.seed * 1_000_003 + self.state.global_step) * 4099 + self.args.process_index
        )
        picks = torch.randperm(n, generator=gen)[: min(n, self.args.replay_batch_size)].tolist()
        batch = collate_replay([self.replay_features[i] for i in picks], self.processing_class.pad_token_id)
        device = loop_w.device
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with self._prefix_states(model, input_ids, attention_mask):
            out = self._loop_forward(model, input_ids, attention_mask)
        token_losses, _ = per_loop_token_losses(
            lm_head, out.loop_hidden_states, batch["labels"].to(device), self.args.lm_chunk_size
        )
        term, _ = weighted_loop_loss(token_losses, loop_w)
        return term, token_losses.mean(dim=1).detach()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ----- optimizer, saving, resuming -------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        probes = getattr(self.accelerator.unwrap_model(self.model), "loop_probes", None)
        if probes is not None:
            ids = {id(p) for p in probes.parameters()}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group(
                {"params": list(probes.parameters()), "lr": self.args.probe_learning_rate, "weight_decay": 0.0}
            )
        return optimizer

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL writes its own card into ``output_dir`` with each checkpoint (a model "fine-tuned from None": it
        cannot see a loopalign base); a gap-SFT run's card is loopalign's (``write_adapter_card``, in ``final/``),
        so none is written here."""
        return None

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.process_index != 0:
            return
        self.save_gap_state(output_dir)
        apply_umask_tree(output_dir)  # transformers / PEFT write weights 0600: a teammate could not read them

    def save_gap_state(self, output_dir: str) -> None:
        """Write the probes (trained and frozen base) and the gap settings, atomically."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        tensors = {}
        probes = getattr(unwrapped, "loop_probes", None)
        if probes is not None:
            tensors.update({f"loop_probes.{k}": v for k, v in probes.state_dict().items()})
        for t, probe in enumerate(self.base_probes or []):
            tensors.update(probe.state(prefix=f"base_probes.{t}."))
        if tensors:
            atomic_save_safetensors(tensors, os.path.join(output_dir, PROBES_FILE), {"num_loops": str(self.num_loops)})
        settings = {
            "num_loops": self.num_loops,
            "probe_layer": self.probe_layer,
            "probe_position": self.args.probe_position,
            "lora_loops": self.args.lora_loops,
            "loss_weights": self.weights,
            "loop_weighting": self.args.loop_weighting,
            "loop_weights": self.args.loop_weights,
            "verdict_tokens": [self.args.verdict_yes, self.args.verdict_no],
            "label_fraction": self.args.label_fraction,
            "distill_folds": self.args.distill_folds,
            "distill_position": self.args.distill_position,
            "probe_targets": self.probe_targets_summary,
            "verdict_layers": self.verdict_layer_indices,
        }
        atomic_write_text(os.path.join(output_dir, GAP_CONFIG_FILE), json.dumps(settings, indent=2))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROBES_FILE)
        if not os.path.exists(path):
            return
        state = load_file(path)
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        probes = getattr(unwrapped, "loop_probes", None)
        if probes is not None:
            probes.load_state_dict(
                {k[len("loop_probes.") :]: v for k, v in state.items() if k.startswith("loop_probes.")}
            )
