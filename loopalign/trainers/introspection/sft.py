"""Introspection SFT: target reports on injected and control trials, the row's injection on during the forward.

Targets: "Yes, I detect an injected thought. The thought is about {concept}." on injected rows, "No, I do
not detect an injected thought." on controls (:func:`loopalign.trainers.introspection.data.introspection_dataset`
with ``with_targets=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from loopalign.injection import inject_rows, load_vectors
from loopalign.io import apply_umask_tree

from ..common import AtomicCheckpointMixin, default_bf16, model_and_tokenizer
from .data import (
    NORM_MATCHED_HELP,
    IntrospectionSFTCollator,
    norm_matched_datasets,
    sft_features,
    validate_injection_rows,
)

__all__ = ["IntrospectionSFTConfig", "IntrospectionSFTTrainer"]


@dataclass
class IntrospectionSFTConfig(SFTConfig):
    """TRL's SFTConfig for the supervised introspection mode (targets on injected and control trials).

    Parameters:
        concept_vectors (`str` or `None`, *optional*, defaults to `None`):
            Concept vectors (.safetensors from data_builders.injection); the trainer's ``concept_vectors``
            argument wins.
        norm_matched (`bool`, *optional*, defaults to `False`):
            Strengths as fractions of the residual-stream norm at the injection site (num_loops, injection loop,
            layer), not multiples of the concept vector, as ``IntrospectionConfig(norm_matched=True)`` in the
            evaluation. The norms are measured once, before training, on the untrained model over the training
            rows' distinct prompts (:func:`~loopalign.trainers.introspection.data.training_site_norms`): a fixed
            yardstick that does not move with training.
    """

    concept_vectors: str | None = field(
        default=None, metadata={"help": "Concept vectors (.safetensors from data_builders.injection)."}
    )
    norm_matched: bool = field(default=False, metadata={"help": NORM_MATCHED_HELP})

    def __post_init__(self):
        self.bf16 = default_bf16(self.bf16)
        super().__post_init__()
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}


class IntrospectionSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """SFT on target introspection reports with the row's injection on during the forward."""

    _tag_names = ["trl", "sft", "loopalign", "introspection"]

    def __init__(
        self,
        model,
        args: IntrospectionSFTConfig,
        train_dataset,
        concept_vectors=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if not isinstance(args, IntrospectionSFTConfig):
            raise TypeError(f"IntrospectionSFTTrainer needs an IntrospectionSFTConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError(
                "IntrospectionSFTTrainer needs processing_class (the tokenizer the dataset was built with)"
            )
        model, processing_class = model_and_tokenizer(model, processing_class, args.model_init_kwargs)
        vectors = concept_vectors if concept_vectors is not None else args.concept_vectors
        if vectors is None:
            raise ValueError("IntrospectionSFTTrainer needs concept_vectors (or args.concept_vectors, a path)")
        self.concept_vectors = load_vectors(vectors)
        self._hidden_size = int(model.config.hidden_size)
        for ds in (train_dataset, *([] if eval_dataset is None else [eval_dataset])):
            validate_injection_rows(ds, self.concept_vectors, model.config)
        #: {(num_loops, injection loop, layer): residual-stream norm} with args.norm_matched, measured here on the
        #: untrained model (a fixed yardstick); None: strengths are multiples of the concept vector
        self.site_norms = None
        if args.norm_matched:
            train_dataset, eval_dataset, self.site_norms = norm_matched_datasets(
                model, processing_class, train_dataset, eval_dataset
            )
        features = sft_features(train_dataset, processing_class, args.max_length)
        eval_features = None if eval_dataset is None else sft_features(eval_dataset, processing_class, args.max_length)
        super().__init__(
            model=model,
            args=args,
            train_dataset=features,
            eval_dataset=eval_features,
            processing_class=processing_class,
            data_collator=IntrospectionSFTCollator(
                processing_class.pad_token_id, self.concept_vectors, self._hidden_size, self.site_norms
            ),
            peft_config=peft_config,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = {k: inputs.pop(k) for k in ("injection_vector", "injection_loop", "injection_layer", "injection_start")}
        with inject_rows(
            model, spec["injection_vector"], spec["injection_loop"], spec["injection_layer"], spec["injection_start"]
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.process_index == 0:
            apply_umask_tree(output_dir or self.args.output_dir)  # transformers / PEFT write weights 0600
