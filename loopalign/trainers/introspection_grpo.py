"""Introspection training: GRPO (and SFT) with concept injection applied inside the rollouts.

:class:`IntrospectionGRPOTrainer` is TRL's ``GRPOTrainer`` (transformers generation; vLLM is refused) where
every rollout runs with its row's injection: ``strength x concept_vector(concept, extraction_loop, layer)``
added after ``layer`` in ``injection_loop`` from the injection start token (the double newline before
"Trial 1") to the end, generated tokens included. The same hooks are active when the log-probabilities are
recomputed (old/reference policy and the loss), so the policy gradient is taken on the injected forward the
completion was sampled from. Control rows get a zero vector. The injection spec travels in dataset columns
(see :func:`introspection_dataset`); the vectors come from a :class:`data_builders.injection.ConceptVectors`.

Prompts are left-padded by GRPO; a row's injection column is ``P - (prompt_length - injection_start)`` with
``P`` the padded prompt width (prompts are end-aligned), the same in generation and in the loss.
The model runs its configured loop count (``config.total_ut_steps``) in training.

:class:`IntrospectionSFTTrainer` is the supervised mode: target reports ("Yes, I detect an injected thought.
The thought is about {concept}." / "No, I do not detect an injected thought.") on injected and control
trials, the injection on during the forward.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import datasets
import torch
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from loopalign.eval.introspection import inject_rows, transcript_prompt, trial_vector
from loopalign.io import apply_umask_tree
from loopalign.rewards.introspection import DEFAULT_REWARD_WEIGHTS, REWARD_KEYS, make_reward_funcs

__all__ = [
    "IntrospectionGRPOConfig",
    "IntrospectionGRPOTrainer",
    "IntrospectionSFTConfig",
    "IntrospectionSFTTrainer",
    "introspection_dataset",
    "validate_injection_rows",
    "load_vectors",
    "DETECT_TARGET",
    "NO_DETECT_TARGET",
    "SPEC_COLUMNS",
]

DETECT_TARGET = "Yes, I detect an injected thought. The thought is about {concept}."
NO_DETECT_TARGET = "No, I do not detect an injected thought."
SPEC_COLUMNS = (
    "trial_type",
    "injected",
    "concept",
    "extraction_loop",
    "injection_loop",
    "layer",
    "strength",
    "injection_start",
    "prompt_length",
)
_SPEC_TENSORS = ("injection_vector", "injection_loop", "injection_layer", "injection_from_end")


def load_vectors(vectors):
    """A ConceptVectors as given, or loaded from a safetensors path."""
    from data_builders.injection import ConceptVectors, load_concept_vectors

    if isinstance(vectors, ConceptVectors):
        return vectors
    if isinstance(vectors, str):
        return load_concept_vectors(vectors)
    raise TypeError(f"concept_vectors must be a ConceptVectors or a path, got {type(vectors).__name__}")


def introspection_dataset(
    tokenizer,
    vectors,
    layers: list[int] | tuple[int, ...] | None = None,
    extraction_loops: list[int] | tuple[int, ...] | None = None,
    injection_loops: list[int] | tuple[int, ...] | None = None,
    strengths: tuple[float, ...] = (4.0,),
    concepts: list[str] | tuple[str, ...] | None = None,
    control_fraction: float = 0.5,
    n_rows: int | None = None,
    seed: int = 0,
    with_targets: bool = False,
) -> datasets.Dataset:
    """Trial rows (string ``prompt`` = the chat-formatted transcript) with the injection spec columns
    :data:`SPEC_COLUMNS`; injected rows cycle over (concept, extraction loop, injection loop, layer, strength),
    ``control_fraction`` of the rows are controls. ``with_targets`` adds the SFT ``completion`` target."""
    if not 0 <= control_fraction < 1:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction}")
    layers = list(layers if layers is not None else vectors.layers)
    ext = list(extraction_loops if extraction_loops is not None else [vectors.num_loops - 1])
    inj = list(injection_loops if injection_loops is not None else [vectors.num_loops - 1])
    concepts = list(concepts if concepts is not None else vectors.vectors)
    prompt, ids, start = transcript_prompt(tokenizer)
    cells = [(c, e, i, j, float(s)) for c in concepts for e in ext for i in inj for j in layers for s in strengths]
    if not cells:
        raise ValueError("introspection_dataset: no (concept, loop, layer, strength) cells")
    n_inj = len(cells) if n_rows is None else max(1, round(n_rows * (1 - control_fraction)))
    n_ctl = round(n_inj * control_fraction / (1 - control_fraction)) if n_rows is None else n_rows - n_inj
    rng = random.Random(seed)
    order = cells * math.ceil(n_inj / len(cells))
    rng.shuffle(order)
    common = {"prompt": prompt, "injection_start": start, "prompt_length": len(ids)}
    rows = []
    for c, e, i, j, s in order[:n_inj]:
        rows.append({**common, "trial_type": "injection", "injected": True, "concept": c, "extraction_loop": e,
                     "injection_loop": i, "layer": j, "strength": s})  # fmt: skip
    for _ in range(n_ctl):
        rows.append({**common, "trial_type": "control", "injected": False, "concept": "", "extraction_loop": -1,
                     "injection_loop": -1, "layer": -1, "strength": 0.0})  # fmt: skip
    rng.shuffle(rows)
    if with_targets:
        for r in rows:
            r["completion"] = DETECT_TARGET.format(concept=r["concept"].lower()) if r["injected"] else NO_DETECT_TARGET
    return datasets.Dataset.from_list(rows)


def validate_injection_rows(rows, vectors, model_config) -> None:
    """Check every row's spec against the vectors and the model: clear ValueErrors for a missing column or concept
    vector, an injection loop >= the model's loops, a layer out of range or not extracted, a bad extraction loop."""
    n_layers = int(model_config.num_hidden_layers)
    n_loops = int(getattr(model_config, "total_ut_steps", 1))
    names = set(rows.column_names) if hasattr(rows, "column_names") else set(rows[0]) if len(rows) else set()
    missing = [c for c in ("prompt", "injection_start", "prompt_length", "concept") if c not in names]
    if "trial_type" not in names and "injected" not in names:
        missing.append("trial_type or injected")
    if missing:
        raise ValueError(f"introspection dataset lacks column(s) {missing}; build it with introspection_dataset()")
    for k in range(len(rows)):
        r = rows[k]
        kind = r.get("trial_type") or ("injection" if r.get("injected") else "control")
        if kind == "control":
            continue
        where = f"row {k} ({kind}, concept {r.get('concept')!r})"
        layer, ti, te = int(r["layer"]), int(r["injection_loop"]), int(r["extraction_loop"])
        if not 0 <= layer < n_layers:
            raise ValueError(f"{where}: layer {layer} out of range: the model has {n_layers} layers (0-based)")
        if not 0 <= ti < n_loops:
            raise ValueError(f"{where}: injection loop {ti} out of range: the model runs {n_loops} loops (0-based)")
        if layer not in vectors.layers:
            raise ValueError(f"{where}: no concept vectors at layer {layer}; extracted layers: {vectors.layers}")
        if not 0 <= te < vectors.num_loops:
            raise ValueError(
                f"{where}: extraction loop {te} out of range: vectors cover loops 0..{vectors.num_loops - 1}"
            )
        if kind != "random" and r.get("concept") not in vectors.vectors:
            raise ValueError(f"{where}: no concept vector for {r.get('concept')!r}; have {sorted(vectors.vectors)}")
        if not 0 <= int(r["injection_start"]) < int(r["prompt_length"]):
            raise ValueError(f"{where}: injection_start {r['injection_start']} not inside the prompt")


def _spec(rows: list[dict], vectors, hidden: int) -> dict[str, torch.Tensor]:
    vec = torch.stack([trial_vector(r, vectors, hidden) for r in rows])
    control = [(r.get("trial_type") or ("injection" if r.get("injected") else "control")) == "control" for r in rows]
    return {
        "injection_vector": vec,
        "injection_loop": torch.tensor([-1 if c else int(r["injection_loop"]) for r, c in zip(rows, control)]),
        "injection_layer": torch.tensor([-1 if c else int(r["layer"]) for r, c in zip(rows, control)]),
        "injection_from_end": torch.tensor([int(r["prompt_length"]) - int(r["injection_start"]) for r in rows]),
        "prompt_length": torch.tensor([int(r["prompt_length"]) for r in rows]),
    }


def _weights_from(value, name: str) -> dict[str, float]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {value!r}") from e
    weights = dict(DEFAULT_REWARD_WEIGHTS if value is None else value)
    unknown = sorted(set(weights) - set(REWARD_KEYS))
    if unknown:
        raise ValueError(f"{name}: unknown reward(s) {unknown}; valid: {list(REWARD_KEYS)}")
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}[{k!r}] must be a number, got {v!r}")
    return {k: float(v) for k, v in weights.items()}


@dataclass
class IntrospectionGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus the introspection rewards. Generation is transformers' (``use_vllm`` must be off)."""

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

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()
        if self.use_vllm:
            raise ValueError("IntrospectionGRPOConfig: use_vllm is not supported (injection hooks need transformers)")
        self.introspection_rewards = _weights_from(self.introspection_rewards, "introspection_rewards")


class _InjectionMixin:
    """Builds and applies per-row injection specs; saves with the user's umask."""

    def _vectors_for(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return _spec(rows, self.concept_vectors, int(self._hidden_size))

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.process_index == 0:
            apply_umask_tree(output_dir or self.args.output_dir)  # transformers / PEFT write weights 0600


class IntrospectionGRPOTrainer(_InjectionMixin, GRPOTrainer):
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
            from transformers import AutoModelForCausalLM

            import loopalign  # noqa: F401

            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
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
        spec = self._vectors_for(list(inputs))
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
            raise RuntimeError(f"injection spec has {spec['injection_vector'].shape[0]} rows for a batch of {total}")
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


# ----- SFT mode ---------------------------------------------------------------------------------


@dataclass
class IntrospectionSFTConfig(SFTConfig):
    """TRL's SFTConfig for the supervised introspection mode (targets on injected and control trials)."""

    concept_vectors: str | None = field(
        default=None, metadata={"help": "Concept vectors (.safetensors from data_builders.injection)."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}


class _SFTCollator:
    def __init__(self, pad_id: int, vectors, hidden: int):
        self.pad_id, self.vectors, self.hidden = pad_id, vectors, hidden

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for k, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[k, :n] = torch.tensor(r["input_ids"])
            mask[k, :n] = 1
            labels[k, :n] = torch.tensor(r["labels"])
        spec = _spec(rows, self.vectors, self.hidden)
        start = torch.tensor([int(r["injection_start"]) for r in rows])  # right padding: columns = token indices
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "injection_vector": spec["injection_vector"],
            "injection_loop": spec["injection_loop"],
            "injection_layer": spec["injection_layer"],
            "injection_start": start,
        }


def _sft_features(dataset, tokenizer, max_length: int | None) -> datasets.Dataset:
    eos = tokenizer.eos_token_id

    def encode(row):
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(p) != int(row["prompt_length"]):
            raise ValueError(
                f"prompt tokenises to {len(p)} tokens, the dataset says {row['prompt_length']}: rebuild the dataset "
                "with this tokenizer"
            )
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + c)[:max_length] if max_length else p + c
        labels = ([-100] * len(p) + c)[: len(ids)]
        return {"input_ids": ids, "labels": labels}

    if "completion" not in dataset.column_names:
        raise ValueError("the SFT mode needs a 'completion' column (introspection_dataset(..., with_targets=True))")
    return dataset.map(encode)


class IntrospectionSFTTrainer(_InjectionMixin, SFTTrainer):
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
        vectors = concept_vectors if concept_vectors is not None else args.concept_vectors
        if vectors is None:
            raise ValueError("IntrospectionSFTTrainer needs concept_vectors (or args.concept_vectors, a path)")
        self.concept_vectors = load_vectors(vectors)
        self._hidden_size = int(model.config.hidden_size)
        if processing_class is None:
            raise ValueError(
                "IntrospectionSFTTrainer needs processing_class (the tokenizer the dataset was built with)"
            )
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        for ds in (train_dataset, *([] if eval_dataset is None else [eval_dataset])):
            validate_injection_rows(ds, self.concept_vectors, model.config)
        features = _sft_features(train_dataset, processing_class, args.max_length)
        eval_features = None if eval_dataset is None else _sft_features(eval_dataset, processing_class, args.max_length)
        super().__init__(
            model=model,
            args=args,
            train_dataset=features,
            eval_dataset=eval_features,
            processing_class=processing_class,
            data_collator=_SFTCollator(processing_class.pad_token_id, self.concept_vectors, self._hidden_size),
            peft_config=peft_config,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = {k: inputs.pop(k) for k in ("injection_vector", "injection_loop", "injection_layer", "injection_start")}
        with inject_rows(
            model, spec["injection_vector"], spec["injection_loop"], spec["injection_layer"], spec["injection_start"]
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
