"""Introspection GRPO: TRL's GRPOTrainer with each row's concept injection inside the rollouts.

:class:`IntrospectionGRPOTrainer` is TRL's ``GRPOTrainer`` (transformers generation; vLLM is refused) where
every rollout runs with its row's injection: ``strength x concept_vector(concept, extraction_loop, layer)``
added after ``layer`` in ``injection_loop`` from the injection start token (the double newline before
"Trial 1") to the end, generated tokens included. The same hooks are active when the log-probabilities are
recomputed (old/reference policy and the loss), so the policy gradient is taken on the injected forward the
completion was sampled from. Control rows get a zero vector. The injection spec travels in dataset columns
(see :func:`loopalign.trainers.introspection.data.introspection_dataset`); the vectors come from a
:class:`loopalign.injection.ConceptVectors`. With ``norm_matched`` a strength is a fraction of the residual-stream
norm at the row's site, measured once on the untrained model before training.

Prompts are left-padded by GRPO; a row's injection column is ``P - (prompt_length - injection_start)`` with
``P`` the padded prompt width (prompts are end-aligned), the same in generation and in the loss.
The model runs its configured loop count (``config.total_ut_steps``) in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from loopalign.errors import ConfigError, ModelError
from loopalign.injection import inject_rows, injection_spec, load_vectors
from loopalign.io import apply_umask_tree
from loopalign.rewards.introspection import DEFAULT_REWARD_WEIGHTS, REWARD_KEYS, make_reward_funcs, reward_weights

from ..common import AtomicCheckpointMixin, default_bf16, model_and_tokenizer
from .data import NORM_MATCHED_HELP, norm_matched_datasets, validate_injection_rows

__all__ = ["IntrospectionGRPOConfig", "IntrospectionGRPOTrainer"]

_SPEC_TENSORS = ("injection_vector", "injection_loop", "injection_layer", "injection_from_end")


@dataclass
class IntrospectionGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus the introspection rewards. Generation is transformers' (``use_vllm`` must be off).

    Parameters:
        introspection_rewards (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Weights of the introspection rewards (JSON or dict); sets ``reward_weights`` when the trainer builds the
            reward functions.
        concept_vectors (`str` or `None`, *optional*, defaults to `None`):
            Concept vectors (.safetensors from data_builders.injection); the trainer's ``concept_vectors``
            argument wins.
        norm_matched (`bool`, *optional*, defaults to `False`):
            Strengths as fractions of the residual-stream norm at the injection site (num_loops, injection loop,
            layer), not multiples of the concept vector, as ``IntrospectionConfig(norm_matched=True)`` in the
            evaluation (the grpo_introspection recipe passes it to its before/after evaluation too). The norms are
            measured once, before training, on the untrained model over the training rows' distinct prompts
            (:func:`~loopalign.trainers.introspection.data.training_site_norms`): a fixed yardstick that does not
            move with training (the rollouts and the loss use the same norms). ``mode: sft`` carries it over
            (:func:`~loopalign.trainers.introspection.mode.sft_config_from`).
    """

    introspection_rewards: dict | str | None = field(
        default=None,
        metadata={
            "help": f"Weights of the introspection rewards (JSON or dict), keys {list(REWARD_KEYS)}; default "
            f"{DEFAULT_REWARD_WEIGHTS}. Sets reward_weights when the trainer builds the reward functions."
        },
    )
    concept_vectors: str | None = field(
        default=None, metadata={"help": "Concept vectors (.safetensors from data_builders.injection)."}
    )
    norm_matched: bool = field(default=False, metadata={"help": NORM_MATCHED_HELP})

    def __post_init__(self):
        self.bf16 = default_bf16(self.bf16)
        super().__post_init__()
        if self.use_vllm:
            raise ConfigError("IntrospectionGRPOConfig: use_vllm is not supported (injection hooks need transformers)")
        self.introspection_rewards = reward_weights(self.introspection_rewards, "introspection_rewards")


class IntrospectionGRPOTrainer(AtomicCheckpointMixin, GRPOTrainer):
    """GRPOTrainer whose rollouts and log-prob recomputations run with each row's concept injection."""

    _tag_names = ["trl", "grpo", "loopalign", "introspection"]

    def __init__(
        self,
        model,
        args: IntrospectionGRPOConfig,
        train_dataset,
        concept_vectors=None,
        reward_funcs=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        judge=None,
        **kwargs,
    ):
        if not isinstance(args, IntrospectionGRPOConfig):
            raise TypeError(f"IntrospectionGRPOTrainer needs an IntrospectionGRPOConfig, got {type(args).__name__}")
        if isinstance(model, str):
            model, processing_class = model_and_tokenizer(model, processing_class, args.model_init_kwargs)
        vectors = concept_vectors if concept_vectors is not None else args.concept_vectors
        if vectors is None:
            raise ValueError("IntrospectionGRPOTrainer needs concept_vectors (or args.concept_vectors, a path)")
        self.concept_vectors = load_vectors(vectors)
        self._hidden_size = int(model.config.hidden_size)
        if int(self.concept_vectors.metadata.get("hidden_size", self._hidden_size)) != self._hidden_size:
            raise ValueError(
                f"concept vectors have hidden size {self.concept_vectors.metadata['hidden_size']}, "
                f"the model {self._hidden_size}"
            )
        for ds in (train_dataset, *([] if eval_dataset is None else [eval_dataset])):
            validate_injection_rows(ds, self.concept_vectors, model.config)
        #: {(num_loops, injection loop, layer): residual-stream norm} with args.norm_matched, measured here on the
        #: untrained model (a fixed yardstick); None: strengths are multiples of the concept vector
        self.site_norms = None
        if args.norm_matched:
            if processing_class is None:
                model, processing_class = model_and_tokenizer(model, None)
            train_dataset, eval_dataset, self.site_norms = norm_matched_datasets(
                model, processing_class, train_dataset, eval_dataset
            )
        if reward_funcs is None:
            reward_funcs, weights = make_reward_funcs(args.introspection_rewards, judge)
            args.reward_weights = weights
        self._active_spec: dict[str, torch.Tensor] | None = None
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )

    # ----- rollouts --------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        spec = injection_spec(list(inputs), self.concept_vectors, self._hidden_size, self.site_norms)
        self._active_spec = spec
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._active_spec = None
        device = output["prompt_ids"].device
        for k in _SPEC_TENSORS:
            output[k] = spec[k].to(device)
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        spec = self._active_spec
        if spec is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        lens = torch.tensor([len(p) for p in prompt_ids])
        if lens.numel() != spec["prompt_length"].numel() or not torch.equal(lens, spec["prompt_length"]):
            raise ValueError(
                f"the trainer tokenised prompts to lengths {lens.tolist()[:4]}..., the dataset's prompt_length column "
                f"says {spec['prompt_length'].tolist()[:4]}...: injection_start would be off; rebuild the dataset "
                "with this tokenizer (introspection_dataset)"
            )
        width = int(lens.max())
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        starts = width - spec["injection_from_end"]
        with inject_rows(self.model, spec["injection_vector"], spec["injection_loop"], spec["injection_layer"], starts):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )

    # ----- log-prob recomputation ------------------------------------------------------------
    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs
    ):
        spec = self._active_spec
        if spec is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, **kwargs
            )
        extra = {k: v for k, v in kwargs.items() if k not in ("compute_entropy", "compute_aux_loss")}
        if any(v is not None for v in extra.values()):
            raise NotImplementedError("IntrospectionGRPOTrainer supports text-only inputs")
        flags = {k: kwargs[k] for k in ("compute_entropy", "compute_aux_loss") if k in kwargs}
        total = input_ids.size(0)
        if spec["injection_vector"].shape[0] != total:
            raise ModelError(f"injection spec has {spec['injection_vector'].shape[0]} rows for a batch of {total}")
        starts = (input_ids.size(1) - logits_to_keep) - spec["injection_from_end"].to(input_ids.device)
        chunk = batch_size or total
        logps, entropies, aux = [], [], []
        for s in range(0, total, chunk):
            e = min(s + chunk, total)
            with inject_rows(
                model,
                spec["injection_vector"][s:e],
                spec["injection_loop"][s:e],
                spec["injection_layer"][s:e],
                starts[s:e],
            ):
                lp, ent, ax = super()._get_per_token_logps_and_entropies(
                    model, input_ids[s:e], attention_mask[s:e], logits_to_keep, batch_size=e - s, **flags
                )
            logps.append(lp)
            if ent is not None:
                entropies.append(ent)
            if ax is not None:
                aux.append(ax)
        return (
            torch.cat(logps, 0),
            torch.cat(entropies, 0) if entropies else None,
            torch.stack(aux).mean() if aux else None,
        )

    def _compute_loss(self, model, inputs):
        if "injection_vector" not in inputs:
            return super()._compute_loss(model, inputs)
        self._active_spec = {k: inputs[k] for k in _SPEC_TENSORS}
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._active_spec = None

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.process_index == 0:
            apply_umask_tree(output_dir or self.args.output_dir)  # transformers / PEFT write weights 0600
