"""Training features for gap SFT, built from rendered verification records.

A rendered record (see ``data_builders``) holds the verification prompt's ``input_ids`` (ending
with the generation prompt), ``verdict_index`` (its last token: the verdict is read from that
position's next-token logits), ``answer_end_index`` / ``probe_indices``, and the verifier
``label``. A feature appends the target verdict ("Yes" for label 1, "No" for 0) and the end of
turn to the prompt; only those tokens carry ``labels``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass

import datasets
import torch

from loopalign.batching import pad_right
from loopalign.data.io import load_build
from loopalign.data.prompts import render_records, verdict_token_ids
from loopalign.data.sources.statements import FAMILIES as STATEMENT_FAMILIES
from loopalign.data.sources.statements import statement_records
from loopalign.data.verification import (
    SOURCES,
    VerificationBuild,
    build_verification,
    synthetic_verification_records,
    table_verification_records,
)
from loopalign.eval import load_eval_dataset
from loopalign.log import get_logger
from loopalign.organism import OrganismConfig, organism_eval_records

logger = get_logger(__name__)

__all__ = [
    "PROBE_POSITIONS",
    "STATEMENT_DATA_SEED",
    "verdict_token_ids",
    "build_gap_features",
    "GapCollator",
    "is_statement_spec",
    "statement_splits",
    "statements_only",
    "table_dataset",
    "with_distill_groups",
]

#: Where the probes read: the end of the candidate answer, or the verdict position.
PROBE_POSITIONS = ("answer_end", "verdict")
REQUIRED_COLUMNS = ("id", "input_ids", "label", "verdict_index", "answer_end_index")


def build_gap_features(
    records,
    tokenizer,
    probe_position: str = "answer_end",
    yes: str = "Yes",
    no: str = "No",
    max_length: int | None = None,
    completion_only: bool = True,
):
    """Map rendered records (a ``datasets.Dataset``) to training features.

    ``completion_only``: only the target verdict and end of turn carry labels (TRL's
    ``completion_only_loss``); False labels the prompt's tokens too (language modelling on the
    whole sequence, as in plain SFT).

    Columns out: input_ids, labels, label, verdict_index, probe_index, id, length (the number of
    tokens, read by ``train_sampling_strategy='group_by_length'``), and ``probe_target`` /
    ``labelled`` when the records carry them (``fit_probe_targets``). A record with ``labelled``
    False keeps no trace of its label: no target verdict is appended (input_ids = the prompt, so
    no term trains on it and it is not in the input) and its ``label`` is -1 (it may be missing).
    Errors name the record and field at fault (a dataset missing the verdict position fails here,
    before training).
    """
    if probe_position not in PROBE_POSITIONS:
        raise ValueError(f"probe_position must be one of {PROBE_POSITIONS}, got {probe_position!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in records.column_names]
    if missing:
        raise ValueError(
            f"gap SFT dataset lacks column(s) {missing} (has {records.column_names}); "
            "render it with data_builders (python -m loopalign.data.verification --render ...)"
        )
    yes_id, no_id = verdict_token_ids(tokenizer, yes, no, option="verdict_yes / verdict_no")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tail = [end_id] if isinstance(end_id, int) and end_id != tokenizer.unk_token_id else []

    has_labelled = "labelled" in records.column_names

    def to_features(row):
        rid = row["id"]
        ids = list(row["input_ids"])
        labelled = bool(row["labelled"]) if has_labelled else True
        if labelled and row["label"] not in (0, 1):
            raise ValueError(f"record {rid!r}: field 'label' must be 0 or 1, got {row['label']!r}")
        v = row["verdict_index"]
        if not isinstance(v, int) or not 0 <= v < len(ids):
            raise ValueError(f"record {rid!r}: field 'verdict_index' {v!r} is outside its {len(ids)} input_ids")
        if v != len(ids) - 1:
            raise ValueError(
                f"record {rid!r}: field 'verdict_index' {v} must be the last prompt token ({len(ids) - 1})"
            )
        p = row["answer_end_index"] if probe_position == "answer_end" else v
        if not isinstance(p, int) or not 0 <= p < len(ids):
            raise ValueError(f"record {rid!r}: field 'answer_end_index' {p!r} is outside its {len(ids)} input_ids")
        target = [yes_id if row["label"] == 1 else no_id, *tail] if labelled else []
        full = ids + target
        if max_length is not None and len(full) > max_length:
            raise ValueError(f"record {rid!r}: {len(full)} tokens exceed max_length={max_length}")
        out = {
            "input_ids": full,
            "labels": ([-100] * len(ids) if completion_only else ids) + target,
            "label": int(row["label"]) if labelled else -1,
            "verdict_index": v,
            "probe_index": p,
            "length": len(full),
        }
        if "probe_target" in row:
            t = row["probe_target"]
            if t is None or not len(t) or any(x is None or not 0.0 <= x <= 1.0 for x in t):
                raise ValueError(f"record {rid!r}: field 'probe_target' must be probabilities in [0, 1], got {t!r}")
        return out

    keep = {
        "input_ids",
        "labels",
        "label",
        "verdict_index",
        "probe_index",
        "id",
        "length",
        "probe_target",
        "labelled",
        "distill_group",
    }
    drop = [c for c in records.column_names if c not in keep]
    return records.map(to_features, remove_columns=drop, desc="gap SFT features")


def with_distill_groups(records, groups: list[str]):
    """``records`` with a ``distill_group`` column: each record's group (``groups``, one name per record, e.g. its
    family) as an int, the index of the name in sorted order; read by probe_distill's pairwise form."""
    if len(groups) != len(records):
        raise ValueError(f"with_distill_groups: {len(groups)} group names for {len(records)} records")
    index = {name: i for i, name in enumerate(sorted(set(groups)))}
    if "distill_group" in records.column_names:
        records = records.remove_columns("distill_group")
    return records.add_column("distill_group", [index[g] for g in groups])


@dataclass
class GapCollator:
    """Right-pads a list of features into a batch.

    Out: input_ids, attention_mask, labels [B,S]; label, verdict_index, probe_index [B];
    labelled [B] bool (all True when the features have no ``labelled``); probe_target [B,T] float
    and distill_group [B] int when the features carry them.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {
            **pad_right(features, self.pad_token_id),
            "label": torch.tensor([int(f["label"]) for f in features]),
            "verdict_index": torch.tensor([int(f["verdict_index"]) for f in features]),
            "probe_index": torch.tensor([int(f["probe_index"]) for f in features]),
            "labelled": torch.tensor([bool(f.get("labelled", True)) for f in features]),
            **self._optional(features, "probe_target", torch.float32),
            **self._optional(features, "distill_group", torch.long),
        }

    @staticmethod
    def _optional(features: list[dict], name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` when every feature carries ``name``, ``{}`` when none does; a mix fails."""
        present = [name in f for f in features]
        if not any(present):
            return {}
        if not all(present):
            raise ValueError(f"GapCollator: some features carry {name!r} and some do not")
        return {name: torch.tensor([f[name] for f in features], dtype=dtype)}


def split_by_task(dataset, eval_fraction: float, seed: int = 0):
    """Split records into (train, eval) so that all answers to one task land on the same side.

    Deterministic by seed; raises when either side would be empty or hold a single class.
    """

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    tasks = sorted(set(dataset["task"]))
    random.Random(seed).shuffle(tasks)
    n_eval = max(1, round(len(tasks) * eval_fraction))
    eval_tasks = set(tasks[:n_eval])
    is_eval = [t in eval_tasks for t in dataset["task"]]
    train = dataset.select([i for i, e in enumerate(is_eval) if not e])
    held_out = dataset.select([i for i, e in enumerate(is_eval) if e])
    for name, part in (("train", train), ("eval", held_out)):
        if len(part) == 0 or len(set(part["label"])) < 2:
            raise ValueError(f"split_by_task: the {name} split has {len(part)} records / one class; use more data")
    return train, held_out


def synthetic_verification(tokenizer, n_problems: int = 120, levels=(1, 2), seed: int = 0):
    """A rendered, label-balanced verification ``datasets.Dataset`` from loopalign.data's synthetic
    arithmetic (gold answer + controlled wrong answers), ready for GapSFTTrainer and evaluate_gap."""

    # wrong answers seeded by 0 whatever the problem seed (as the dataset has always been built)
    rendered = synthetic_verification_records(tokenizer, n_problems, seed=seed, levels=tuple(levels), candidate_seed=0)
    return datasets.Dataset.from_list(rendered)


def load_verification_dataset(
    spec: str,
    tokenizer,
    tokenizer_name: str,
    out_dir: str,
    limit: int | None = None,
    candidates: str = "controlled",
    policy: str | None = None,
    field_map: str = "beavertails",
    split: str = "train",
    synthetic_levels=(1, 2),
    seed: int = 0,
):
    """A rendered verification dataset from a spec:

    - ``"synthetic"``: loopalign.data's synthetic arithmetic (``limit`` problems, default 160);
    - a data_builders build folder, a ``save_to_disk`` folder or a ``.jsonl`` of rendered records;
    - ``"SOURCE:PATH_OR_HUB_NAME"`` with a data_builders source (``gsm8k:openai/gsm8k``,
      ``gsm8k-solutions:/data/example_model_solutions.jsonl``, ``safety-pairs:PKU-Alignment/PKU-SafeRLHF``,
      ``xstest-completions:/data/xstest/model_completions``): built (candidates, label balancing,
      rendering with ``tokenizer_name``) into ``out_dir`` and loaded.
    """

    if spec == "synthetic":
        return synthetic_verification(tokenizer, limit or 160, synthetic_levels, seed=seed)
    source, sep, path = spec.partition(":")
    if sep and source in SOURCES:
        cfg = VerificationBuild(
            source=source,
            path=path,
            out=out_dir,
            n=limit,
            seed=seed,
            field_map=field_map,
            split=split,
            candidates=candidates,
            policy=policy,
            balance=True,
            render=True,
            tokenizer=tokenizer_name,
        )
        differs = _build_differs(out_dir, cfg)
        if differs is None:
            logger.info(f"reusing the verification build in {out_dir} (same settings)")
        else:
            if differs:  # a build of other data left in this folder (another run's): never train on it
                logger.info(f"rebuilding {out_dir}: the build there has other settings ({'; '.join(differs)})")
            build_verification(dataclasses.replace(cfg, overwrite=bool(differs)))
        return load_build(out_dir)[0]
    if sep and not os.path.exists(spec):
        raise ValueError(f"dataset spec {spec!r}: unknown source {source!r}; sources: {list(SOURCES)}")

    return load_eval_dataset(spec)


def _build_differs(out_dir: str, cfg) -> list[str] | None:
    """None when ``out_dir`` holds a build made with ``cfg``'s settings; else the settings that
    differ ("name: there -> wanted"), empty when there is no build."""

    meta_path = os.path.join(out_dir, "metadata.json")
    if not os.path.exists(meta_path):
        return []
    with open(meta_path) as f:
        there = json.load(f).get("settings", {})
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite")}
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as the metadata stores them
    changed = [f"{k}: {there.get(k)!r} -> {v!r}" for k, v in wanted.items() if there.get(k) != v]
    return changed or None


def organism_verification(
    tokenizer, n_problems: int = 1000, eval_fraction: float = 0.3, seed: int = 0, organism_config=None
):
    """(train, held-out) rendered verification ``datasets.Dataset``s of the model organism's digit
    tasks, split the way the organism was trained: training records come from the train triples
    (the ones the organism saw), held-out records from the evaluation triples, which no organism
    or gap-SFT run trains on (``loopalign.data.sources.digits``). ``n_problems`` distinct tasks in
    all, ``eval_fraction`` of them held out; the gold and one wrong digit each (balanced).
    ``organism_config``: the organism's settings (its operand range; default ``OrganismConfig()``)."""

    cfg = organism_config or OrganismConfig()
    if cfg.tasks != "digits":
        raise ValueError(
            f"the 'organism' dataset is the digit tasks of recipe v2; this organism was trained on {cfg.tasks!r} "
            "tasks: use dataset 'synthetic'"
        )

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = max(1, round(n_problems * eval_fraction))
    n_train = n_problems - n_eval
    if n_train < 1:
        raise ValueError(f"organism_verification: {n_problems} problems leave none to train on")
    kwargs = dict(seed=seed, tasks="digits", organism=cfg)
    train = organism_eval_records(tokenizer, n_train, split="train", **kwargs)
    held_out = organism_eval_records(tokenizer, n_eval, split="eval", **kwargs)
    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held_out)


#: the statement data are built with this seed whatever the run's seed: runs of several seeds share their held-out
#: entities
STATEMENT_DATA_SEED = 0


def is_statement_spec(spec: str | None) -> bool:
    """True for ``statements`` / ``statements:FAMILIES`` (built on the fly by :func:`statement_splits`)."""
    return spec is not None and (spec == "statements" or spec.startswith("statements:"))


def statement_splits(
    spec: str, tokenizer, per_family: int | None = None, eval_fraction: float = 0.3, max_length: int | None = None
):
    """``statements[:FAMILIES]``: true/false statements (:mod:`loopalign.data.sources.statements`; every family when
    none is named), ``per_family`` of each (default 300), rendered with ``tokenizer``, split by entity as the builder
    splits them (``eval_fraction`` of the entities held out, the same entities in every family, data seed
    :data:`STATEMENT_DATA_SEED`). -> (train, held-out) ``datasets.Dataset``s."""
    _, _, families = spec.partition(":")
    records = statement_records(
        families or ",".join(STATEMENT_FAMILIES),
        per_family=per_family or 300,
        seed=STATEMENT_DATA_SEED,
        eval_fraction=eval_fraction,
    )
    rows, _ = render_records(records, tokenizer, max_length=max_length)
    split = [json.loads(r["meta"])["split"] for r in rows]
    data = datasets.Dataset.from_list(rows)
    train = data.select([i for i, s in enumerate(split) if s == "train"])
    held_out = data.select([i for i, s in enumerate(split) if s == "eval"])
    for name, part in (("train", train), ("held-out", held_out)):
        if len(part) == 0 or len(set(part["label"])) < 2:
            raise ValueError(f"dataset {spec}: the {name} split is empty or one class; raise dataset_limit")
    logger.info(f"statements ({families or 'every family'}): {len(train)} train / {len(held_out)} held-out records")
    return train, held_out


def statements_only(dataset) -> bool:
    """True when every record is a statement (a claim judged true or false: no task the model answers, so no TP)."""
    return "scenario" in dataset.column_names and set(dataset["scenario"]) == {"statement"}


def table_dataset(
    path: str,
    tokenizer,
    columns: str,
    scenario: str | None = None,
    max_length: int | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
):
    """A user's own ``.jsonl`` / ``.csv`` read through the column map ``columns`` and rendered with ``tokenizer``
    (:func:`loopalign.data.verification.table_verification_records`); prints the rows read, kept and rejected.
    -> ``datasets.Dataset``."""
    rows, report = table_verification_records(
        tokenizer, path, columns, scenario=scenario, max_length=max_length, skip_invalid=skip_invalid, limit=limit
    )
    logger.info(
        f"{path}: {report['read']} rows read, {report['kept']} kept, {report['rejected']} rejected"
        + (f" {report['rejected_by_reason']}" if report["rejected"] else "")
        + f" ({report['scenario']}; columns {report['columns']})"
    )
    return datasets.Dataset.from_list(rows)
