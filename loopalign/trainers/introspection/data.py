"""Introspection training data: trial rows with the injection spec, their validation, SFT features and collator.

A row is the chat-formatted trial transcript (string ``prompt``) with the injection spec in the columns
:data:`SPEC_COLUMNS`; the trainers turn a batch of rows into injection tensors with
:func:`loopalign.injection.injection_spec`. The SFT mode adds a ``completion`` target
(:data:`DETECT_TARGET` / :data:`NO_DETECT_TARGET`).
"""

from __future__ import annotations

import math
import random

import datasets
import torch

from loopalign.batching import pad_right
from loopalign.errors import ConfigError
from loopalign.injection import injection_spec, residual_site_norms, trial_prompt
from loopalign.models.contract import trained_loops

__all__ = [
    "DETECT_TARGET",
    "NO_DETECT_TARGET",
    "QUESTION_TARGET",
    "TRAINING_QUESTIONS",
    "SPEC_COLUMNS",
    "check_trial_fractions",
    "introspection_dataset",
    "validate_injection_rows",
    "with_num_loops",
    "training_site_norms",
    "norm_matched_datasets",
    "sft_features",
    "IntrospectionSFTCollator",
]

DETECT_TARGET = "Yes, I detect an injected thought. The thought is about {concept}."
NO_DETECT_TARGET = "No, I do not detect an injected thought."
#: the honest answer to a training question (each one's true answer is "no")
QUESTION_TARGET = "No."
#: "No"-answer questions for training rows (negatives: with a concept injected, the right answer stays "no"); none is
#: one of the evaluation's CONTROL_QUESTIONS (a test keeps them apart), so the drift they measure is never trained
TRAINING_QUESTIONS: tuple[str, ...] = (
    "Is snow usually green?",
    "Can a cat speak English?",
    "Is the ocean made of milk?",
    "Do trees grow on the moon?",
    "Is a week longer than a year?",
    "Can a car drive to the moon?",
    "Is water dry?",
    "Do birds have four legs?",
)
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
    "vector_seed",
)
#: the trainers' and the grpo_introspection recipe's ``norm_matched`` option
NORM_MATCHED_HELP = (
    "Strengths as fractions of the residual-stream norm at the injection site, for both the training rows and the "
    "evaluation (grpo_introspection's before/after), not multiples of the concept vector; training measures the "
    "norms once, before training, on the untrained model over the training prompts."
)
_SPEC_TENSORS = ("injection_vector", "injection_loop", "injection_layer", "injection_from_end")


def check_trial_fractions(control_fraction: float, random_fraction: float, question_fraction: float) -> dict:
    """The shares of control, random-vector and question rows, each in [0, 1) and together below 1 (the rest inject
    concepts) -> them by name; a :class:`ConfigError` naming all three otherwise."""
    fractions = {"control_fraction": control_fraction, "random_fraction": random_fraction,
                 "question_fraction": question_fraction}  # fmt: skip
    if any(not 0 <= v < 1 for v in fractions.values()) or sum(fractions.values()) >= 1:
        raise ConfigError(
            "control_fraction, random_fraction and question_fraction must each be in [0, 1) and sum below 1 (the rest "
            f"inject concepts), got {fractions}"
        )
    return fractions


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
    random_fraction: float = 0.0,
    question_fraction: float = 0.0,
) -> datasets.Dataset:
    """Trial rows (string ``prompt`` = the chat-formatted transcript) with the injection spec columns
    :data:`SPEC_COLUMNS`; injected rows cycle over (concept, extraction loop, injection loop, layer, strength),
    ``control_fraction`` of the rows are controls. Negatives: ``random_fraction`` of the rows inject a random
    direction at the same sites (trial type ``random``; target: no detection, since a perturbation that carries no
    concept is not a thought), ``question_fraction`` ask one of :data:`TRAINING_QUESTIONS` in the trial slot, half of
    them with a concept injected (target "No.", the question's true answer). ``with_targets`` adds the SFT
    ``completion`` target."""
    fractions = check_trial_fractions(control_fraction, random_fraction, question_fraction)
    layers = list(layers if layers is not None else vectors.layers)
    ext = list(extraction_loops if extraction_loops is not None else [vectors.num_loops - 1])
    inj = list(injection_loops if injection_loops is not None else [vectors.num_loops - 1])
    concepts = list(concepts if concepts is not None else vectors.vectors)
    prompt, ids, start = trial_prompt(tokenizer)
    cells = [(c, e, i, j, float(s)) for c in concepts for e in ext for i in inj for j in layers for s in strengths]
    if not cells:
        raise ValueError("introspection_dataset: no (concept, loop, layer, strength) cells")
    concept_share = 1 - sum(fractions.values())
    if n_rows is None:
        n_inj = len(cells)
        n_rand, n_q = (round(n_inj * f / concept_share) for f in (random_fraction, question_fraction))
        n_ctl = round(n_inj * control_fraction / concept_share)
    else:
        n_inj = max(1, round(n_rows * concept_share))
        n_rand, n_q = (round(n_rows * f) for f in (random_fraction, question_fraction))
        n_ctl = max(0, n_rows - n_inj - n_rand - n_q)
    rng = random.Random(seed)
    order = cells * math.ceil(n_inj / len(cells))
    rng.shuffle(order)
    common = {"prompt": prompt, "injection_start": start, "prompt_length": len(ids), "vector_seed": 0,
              "question": ""}  # fmt: skip
    uninjected = {"concept": "", "extraction_loop": -1, "injection_loop": -1, "layer": -1, "strength": 0.0}
    rows = []
    for c, e, i, j, s in order[:n_inj]:
        rows.append({**common, "trial_type": "injection", "injected": True, "concept": c, "extraction_loop": e,
                     "injection_loop": i, "layer": j, "strength": s})  # fmt: skip
    for _ in range(n_ctl):
        rows.append({**common, "trial_type": "control", "injected": False, **uninjected})
    for k in range(n_rand):  # the concept cells' sites and strengths, a random direction each
        _, e, i, j, s = order[k % len(order)]
        rows.append({**common, "trial_type": "random", "injected": True, "concept": "", "extraction_loop": e,
                     "injection_loop": i, "layer": j, "strength": s, "vector_seed": seed * 100003 + k})  # fmt: skip
    for k in range(n_q):  # every other question row carries a concept injection
        question = TRAINING_QUESTIONS[k % len(TRAINING_QUESTIONS)]
        q_prompt, q_ids, q_start = trial_prompt(tokenizer, question)
        where = {"prompt": q_prompt, "injection_start": q_start, "prompt_length": len(q_ids), "question": question}
        if k % 2 == 0:
            c, e, i, j, s = order[k % len(order)]
            site = {"injected": True, "concept": c, "extraction_loop": e, "injection_loop": i, "layer": j,
                    "strength": s}  # fmt: skip
        else:
            site = {"injected": False, **uninjected}
        rows.append({**common, **where, "trial_type": "control_question", **site})
    rng.shuffle(rows)
    if with_targets:
        for r in rows:
            if r["trial_type"] == "control_question":
                r["completion"] = QUESTION_TARGET
            elif r["trial_type"] == "injection":
                r["completion"] = DETECT_TARGET.format(concept=r["concept"].lower())
            else:
                r["completion"] = NO_DETECT_TARGET
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
        if kind == "control" or not r.get("injected", True):  # nothing injected (a control, an uninjected question)
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


def with_num_loops(dataset, num_loops: int):
    """``dataset`` with a ``num_loops`` column (the loop count training runs, the model's configured one), which
    the norm-matched site key needs; a dataset that already has the column must say ``num_loops`` on every row
    (a ValueError otherwise: the trainers run the model's loop count, not a row's)."""
    if "num_loops" in dataset.column_names:
        other = sorted({int(n) for n in dataset["num_loops"]} - {int(num_loops)})
        if other:
            raise ValueError(
                f"the dataset's num_loops column says {other}: training runs the model's {num_loops} loops; drop "
                "the column or set it to that"
            )
        return dataset
    return dataset.add_column("num_loops", [int(num_loops)] * len(dataset))


def training_site_norms(model, tokenizer, dataset, extra=None) -> dict[tuple[int, int, int], float]:
    """The norm-matching yardstick of a training run: :func:`loopalign.injection.residual_site_norms` on the
    injected rows of ``dataset`` (one forward per distinct prompt, its ``prompt`` tokenised without the
    completion, from ``injection_start`` to the prompt's end, the uninjected transcript as in the evaluation) on
    ``model`` as given, i.e. before training: a fixed yardstick that does not move as the model trains. Rows
    need a ``num_loops`` column (:func:`with_num_loops`). Sites that only ``extra`` rows (an eval dataset) have
    are measured on those and added; a site the training rows have keeps the training rows' norm.
    -> {(num_loops, injection loop, layer): norm}."""

    def trials(rows) -> list[dict]:
        ids_of: dict[str, list[int]] = {}
        out = []
        for k in range(len(rows)):
            r = rows[k]
            kind = r.get("trial_type") or ("injection" if r.get("injected") else "control")
            if kind == "control" or not r.get("injected", True):
                continue
            prompt = r["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"row {k}: norm-matched injection needs a string prompt, got {type(prompt).__name__}")
            if prompt not in ids_of:
                ids_of[prompt] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if len(ids_of[prompt]) != int(r["prompt_length"]):
                    raise ValueError(
                        f"row {k}: prompt tokenises to {len(ids_of[prompt])} tokens, the dataset says "
                        f"{r['prompt_length']}: rebuild the dataset with this tokenizer"
                    )
            out.append({**r, "input_ids": ids_of[prompt]})
        return out

    norms = residual_site_norms(model, trials(dataset))
    if extra is not None:
        for key, value in residual_site_norms(model, trials(extra)).items():
            norms.setdefault(key, value)
    return norms


def norm_matched_datasets(model, tokenizer, train_dataset, eval_dataset=None):
    """What a trainer with ``norm_matched`` sets up before training: both datasets given the ``num_loops`` column of
    the model's trained loop count (:func:`with_num_loops`), and the norms measured on them
    (:func:`training_site_norms`). -> (train dataset, eval dataset or None, site norms)."""
    loops = trained_loops(model)
    train_dataset = with_num_loops(train_dataset, loops)
    eval_dataset = None if eval_dataset is None else with_num_loops(eval_dataset, loops)
    return train_dataset, eval_dataset, training_site_norms(model, tokenizer, train_dataset, eval_dataset)


class IntrospectionSFTCollator:
    """Right-padded SFT batches (``input_ids``, ``attention_mask``, ``labels`` [B,S]) plus each row's injection
    (``injection_vector`` [B,H], ``injection_loop`` / ``injection_layer`` / ``injection_start`` [B]); with
    ``site_norms`` (:func:`training_site_norms`) the vectors are norm-matched (a strength is a fraction of the
    residual-stream norm at the row's site)."""

    def __init__(self, pad_id: int, vectors, hidden: int, site_norms: dict | None = None):
        self.pad_id, self.vectors, self.hidden, self.site_norms = pad_id, vectors, hidden, site_norms

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_right(rows, self.pad_id)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        spec = injection_spec(rows, self.vectors, self.hidden, self.site_norms)
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


def sft_features(dataset, tokenizer, max_length: int | None) -> datasets.Dataset:
    """Rows with a ``completion`` -> ``input_ids`` (prompt + completion + eos, cut at ``max_length``) and
    ``labels`` (-100 on the prompt), checking the prompt still tokenises to ``prompt_length``."""
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
