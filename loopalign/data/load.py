"""The one resolver of ``--dataset``: every dataset spec the commands take, read into records, and the one task split.

``loopalign eval-gap``, ``loopalign sft-gap`` and ``loopalign ablate-gap`` (which runs sft-gap) read ``--dataset``
here and nowhere else, so one spec means the same records in each (docs/data.md, "The --dataset vocabulary"):

==========================  ===========================================================================================
``organism``                the gap organism's digit tasks: training tasks and held-out ones (needs a gap organism as
                            the model; its tasks come from :class:`OrganismTasks`, given by the caller)
``synthetic``               synthetic arithmetic, the gold and one controlled wrong answer per problem
``statements[:FAMILIES]``   true/false statements by family (:mod:`loopalign.data.sources.statements`), split by entity
a build folder              ``metadata.json`` + ``dataset/`` (``loopalign build-data``, ``build-statements``)
a ``save_to_disk`` folder   rendered records saved by ``datasets``
``FILE.jsonl`` / ``.json``  rendered records
``FILE.csv`` / ``.jsonl``   your own rows, with ``--dataset_columns`` (rendered with the model's chat template)
``SOURCE:PATH_OR_HUB``      a data source (``gsm8k:openai/gsm8k``, ``gsm8k-solutions:FILE``, ``safety-pairs:NAME``,
                            ``xstest-completions:DIR``), built into ``build_dir`` and reused while its settings match
==========================  ===========================================================================================

A hub dataset is read through its source (``gsm8k:openai/gsm8k``): a bare name that is no file or folder fails,
naming the sources.

Two readings of one spec: :func:`load_dataset` gives the records a command evaluates (for ``organism`` and
``statements``, the held-out side, never trained on; otherwise the whole set), :func:`load_dataset_splits` gives
(train, held-out), split by the data's own split where it has one (organism triples, statement entities) and else
by :func:`split_by_task` (every answer to one task on one side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from loopalign.data.io import load_build
from loopalign.data.prompts import check_rendered_with, render_records
from loopalign.data.sources.statements import FAMILIES as STATEMENT_FAMILIES
from loopalign.data.sources.statements import check_statement_options, statement_records
from loopalign.data.verification import (
    SOURCES,
    VerificationBuild,
    build_verification,
    source_of_spec,
    synthetic_verification_records,
    table_verification_records,
)
from loopalign.errors import ConfigError, DataError
from loopalign.log import get_logger

logger = get_logger(__name__)

__all__ = [
    "DATASET_HELP",
    "DATASET_KINDS",
    "STATEMENT_DATA_SEED",
    "DatasetRequest",
    "OrganismTasks",
    "dataset_kind",
    "is_statement_spec",
    "load_dataset",
    "load_dataset_splits",
    "load_rendered",
    "split_by_task",
    "statement_splits",
    "statements_only",
    "statement_families_of",
]

#: what :func:`dataset_kind` calls each spec
DATASET_KINDS = ("organism", "synthetic", "statements", "table", "source", "build", "saved", "records")

#: the ``--dataset`` help every command shows (each adds its default)
DATASET_HELP = (
    "'organism' (the gap organism's digit tasks: training tasks and held-out ones) | 'synthetic' (arithmetic, gold "
    "and a wrong answer each) | 'statements[:FAMILIES]' (true/false statements, split by entity) | a build folder, "
    "save_to_disk folder or .jsonl of rendered records | SOURCE:PATH_OR_HUB built on the fly (gsm8k:openai/gsm8k, "
    "gsm8k-solutions:FILE, safety-pairs:PKU-Alignment/PKU-SafeRLHF, xstest-completions:DIR) | your own .csv / .jsonl "
    "with --dataset_columns (docs/data.md)."
)

#: the statement data are built with this seed whatever the run's seed: runs of several seeds share their held-out
#: entities
STATEMENT_DATA_SEED = 0


@dataclass(frozen=True)
class OrganismTasks:
    """The gap organism's digit tasks as a dataset. The organism lives above the data floor, so the command that
    knows its model hands them in (``loopalign.organism.organism_tasks``).

    Args:
        records: ``(tokenizer, n_problems, split, seed) -> rendered records``; ``split`` is "train" (the tasks the
            organism trained on) or "eval" (held-out triples no organism or gap-SFT run trains on).
        group_field: the record field that clusters them (their (item, a, b) triple).
    """

    records: Callable[..., list[dict]]
    group_field: str


@dataclass(frozen=True)
class DatasetRequest:
    """One ``--dataset`` spec and the options that shape its records.

    Args:
        spec: the spec (the module's table).
        limit: problems (organism: distinct tasks, synthetic: problems), rows (a table or a source), statements per
            family; None: each kind's own default (organism 1000, synthetic 160, statements 300, else all).
        eval_fraction: the share held out by :func:`load_dataset_splits` (tasks, triples or entities).
        seed: the seed of generated problems and their wrong answers, of a source build and of the task split.
        synthetic_levels: levels of the synthetic problems.
        columns / scenario / skip_invalid: your own table's column map, scenario and whether bad rows are left out
            (and counted) instead of failing; a table needs ``columns``.
        max_length: prompt tokens a rendered record may hold (None: no limit).
        candidates / policy / field_map / split / tokenizer_name / build_dir: a ``SOURCE:PATH`` build's answers
            (controlled | sampled, by ``policy``), field map, hub split, rendering tokenizer and folder.
    """

    spec: str
    limit: int | None = None
    eval_fraction: float = 0.3
    seed: int = 0
    synthetic_levels: tuple[int, ...] = (1, 2)
    columns: str | None = None
    scenario: str | None = None
    skip_invalid: bool = False
    max_length: int | None = None
    candidates: str = "controlled"
    policy: str | None = None
    field_map: str = "beavertails"
    split: str = "train"
    tokenizer_name: str = "local"
    build_dir: str | None = None

    def __post_init__(self):
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ConfigError(f"dataset must name a dataset, got {self.spec!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"dataset_limit must be >= 1 (or unset), got {self.limit}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.candidates not in ("controlled", "sampled"):
            raise ConfigError(f"candidates must be 'controlled' or 'sampled', got {self.candidates!r}")

    @property
    def kind(self) -> str:
        return dataset_kind(self.spec, self.columns)


def is_statement_spec(spec: str | None) -> bool:
    """True for ``statements`` / ``statements:FAMILIES`` (built on the fly by :func:`statement_splits`)."""
    return spec is not None and (spec == "statements" or spec.startswith("statements:"))


def statement_families_of(spec: str | None) -> list[str] | None:
    """The statement families ``spec`` holds, known before anything loads: those a ``statements[:FAMILIES]`` spec
    names (every family when none is named), or those a statement build's ``metadata.json`` counts; None for any
    other dataset (its families are read from its records)."""
    if is_statement_spec(spec):
        _, _, families = spec.partition(":")
        return check_statement_options(families or ",".join(STATEMENT_FAMILIES), 2, 0.5)
    path = os.path.join(spec or "", "metadata.json")
    if spec and os.path.isfile(path):
        with open(path) as f:
            meta = json.load(f)  # a build's metadata (loopalign.data.io.save_build): a dict
        families = meta.get("counts", {}).get("family")
        if meta.get("builder") == "data_builders.statements" and isinstance(families, dict):
            return sorted(families)
    return None


def dataset_kind(spec: str, columns: str | None = None) -> str:
    """What ``spec`` names (one of :data:`DATASET_KINDS`); a spec that names nothing fails here, before any model
    loads, naming the spec."""
    if columns is not None:
        if not os.path.isfile(spec):
            raise DataError(f"dataset {spec!r} (read with --dataset_columns) is not a file")
        return "table"
    if spec in ("organism", "synthetic"):
        return spec
    if is_statement_spec(spec):
        return "statements"
    if os.path.isdir(spec):
        return "build" if os.path.exists(os.path.join(spec, "metadata.json")) else "saved"
    if os.path.isfile(spec):
        if not spec.endswith((".jsonl", ".json")):
            raise DataError(
                f"dataset {spec!r}: a file of rendered records is .jsonl or .json; read your own .csv with "
                "--dataset_columns"
            )
        return "records"
    source, sep, path = spec.partition(":")
    if sep and source == "table":  # the table source needs its column map: the commands take it as an option
        raise DataError(
            f"dataset {spec!r}: read your own table as --dataset {path} --dataset_columns MAP (docs/data.md)"
        )
    if sep and source in SOURCES:
        source_of_spec(spec)  # a source without its path ('gsm8k:') fails here
        return "source"
    if sep:
        raise DataError(f"dataset spec {spec!r}: unknown source {source!r}; sources: {list(SOURCES)}")
    raise DataError(
        f"dataset {spec!r} does not exist: not a file or folder, and a hub dataset is read through its source "
        f"(SOURCE:NAME, e.g. gsm8k:openai/gsm8k; sources: {list(SOURCES)})"
    )


def load_rendered(path: str):
    """A build folder (metadata.json + dataset/), a ``save_to_disk`` folder, or a .jsonl/.json file of rendered
    records -> ``datasets.Dataset``; an empty one fails, naming it."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "metadata.json")):
        return load_build(path)[0]
    if os.path.isdir(path):
        data = datasets.load_from_disk(path)
    elif path.endswith((".jsonl", ".json")):
        if not os.path.exists(path):
            raise DataError(f"dataset {path!r} does not exist")
        with open(path, "rb") as f:
            empty = not f.read(4096).strip()
        if empty:  # datasets' JSON reader would stop with a bare StopIteration
            raise DataError(f"dataset {path!r} is empty: no records to evaluate or train on")
        data = datasets.Dataset.from_json(path)
    elif os.path.exists(path):
        raise DataError(f"dataset {path!r}: expected a build folder, a save_to_disk folder or a .jsonl file")
    else:
        raise DataError(f"dataset {path!r} does not exist")
    if len(data) == 0:
        raise DataError(f"dataset {path!r} holds no records")
    return data


def split_by_task(dataset, eval_fraction: float, seed: int = 0):
    """Split records into (train, eval) so that all answers to one task land on the same side.

    Deterministic by seed; raises when either side would be empty or hold a single class.
    """

    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    tasks = sorted(set(dataset["task"]))
    random.Random(seed).shuffle(tasks)
    n_eval = max(1, round(len(tasks) * eval_fraction))
    eval_tasks = set(tasks[:n_eval])
    is_eval = [t in eval_tasks for t in dataset["task"]]
    train = dataset.select([i for i, e in enumerate(is_eval) if not e])
    held_out = dataset.select([i for i, e in enumerate(is_eval) if e])
    for name, part in (("train", train), ("eval", held_out)):
        if len(part) == 0 or len(set(part["label"])) < 2:
            raise DataError(f"split_by_task: the {name} split has {len(part)} records / one class; use more data")
    return train, held_out


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
            raise DataError(f"dataset {spec}: the {name} split is empty or one class; raise dataset_limit")
    logger.info(f"statements ({families or 'every family'}): {len(train)} train / {len(held_out)} held-out records")
    return train, held_out


def statements_only(dataset) -> bool:
    """True when ``dataset`` (a ``datasets.Dataset`` or a list of records) has records and every one is a statement
    (a claim judged true or false; TP asks each entity's question instead of the records' tasks, see
    ``loopalign.data.sources.statements.statement_tasks``)."""
    if hasattr(dataset, "column_names"):
        return "scenario" in dataset.column_names and set(dataset["scenario"]) == {"statement"}
    rows = list(dataset)
    return bool(rows) and all(row.get("scenario") == "statement" for row in rows)


def _table(request: DatasetRequest, tokenizer):
    rows, report = table_verification_records(
        tokenizer,
        request.spec,
        request.columns,
        scenario=request.scenario,
        max_length=request.max_length,
        skip_invalid=request.skip_invalid,
        limit=request.limit,
    )
    logger.info(
        f"{request.spec}: {report['read']} rows read, {report['kept']} kept, {report['rejected']} rejected"
        + (f" {report['rejected_by_reason']}" if report["rejected"] else "")
        + f" ({report['scenario']}; columns {report['columns']})"
    )
    return datasets.Dataset.from_list(rows)


def _source_build(request: DatasetRequest):
    if request.build_dir is None:
        raise ConfigError(f"dataset {request.spec!r} is built from its source: it needs a build folder (build_dir)")
    source, path = source_of_spec(request.spec)
    cfg = VerificationBuild(
        source=source,
        path=path,
        out=request.build_dir,
        n=request.limit,
        seed=request.seed,
        field_map=request.field_map,
        split=request.split,
        candidates=request.candidates,
        policy=request.policy,
        balance=True,
        render=True,
        tokenizer=request.tokenizer_name,
    )
    differs = _build_differs(request.build_dir, cfg)
    if differs is None:
        logger.info(f"reusing the verification build in {request.build_dir} (same settings)")
    else:
        if differs:  # a build of other data left in this folder (another run's): never train on it
            logger.info(f"rebuilding {request.build_dir}: the build there has other settings ({'; '.join(differs)})")
        build_verification(dataclasses.replace(cfg, overwrite=bool(differs)))
    return load_build(request.build_dir)[0]


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


def _synthetic(request: DatasetRequest, tokenizer):
    records = synthetic_verification_records(
        tokenizer, request.limit or 160, seed=request.seed, levels=tuple(request.synthetic_levels)
    )
    return datasets.Dataset.from_list(records)


def _organism_tasks(request: DatasetRequest, organism: OrganismTasks | None) -> OrganismTasks:
    if organism is None:
        raise ConfigError(
            "dataset 'organism' is the gap organism's digit tasks: it needs a gap organism trained on digit tasks as "
            "the model (use dataset 'synthetic' for another model)"
        )
    return organism


def _whole(request: DatasetRequest, tokenizer):
    """Every record of a spec without a split of its own (synthetic, a table, a source, a file or folder)."""
    kind = request.kind
    if kind == "synthetic":
        return _synthetic(request, tokenizer)
    if kind == "table":
        return _table(request, tokenizer)
    data = _source_build(request) if kind == "source" else load_rendered(request.spec)
    check_rendered_with(data, tokenizer)  # a build rendered for another model would be read as noise
    return data


def load_dataset(request: DatasetRequest, tokenizer, organism: OrganismTasks | None = None):
    """The records a command evaluates, and the field that clusters them -> (records, group field): for
    ``organism``, ``limit`` (default 1000) of its held-out tasks (a list of dicts); for ``statements``, the held-out
    entities, as :func:`load_dataset_splits` holds them out; for every other spec, the whole set."""
    kind = request.kind
    if kind == "organism":
        tasks = _organism_tasks(request, organism)
        return tasks.records(tokenizer, request.limit or 1000, "eval", request.seed), tasks.group_field
    if kind == "statements":
        return load_dataset_splits(request, tokenizer)[1], "task"
    return _whole(request, tokenizer), "task"


def load_dataset_splits(request: DatasetRequest, tokenizer, organism: OrganismTasks | None = None):
    """(train, held-out) ``datasets.Dataset``s of a spec: the organism's training tasks and held-out triples
    (``limit`` distinct tasks in all, default 1000, ``eval_fraction`` of them held out), the statements' training and
    held-out entities, and for every other spec :func:`split_by_task` of the whole set (seeded by ``seed``)."""
    kind = request.kind
    if kind == "organism":
        tasks = _organism_tasks(request, organism)
        n = request.limit or 1000
        n_eval = max(1, round(n * request.eval_fraction))
        if n - n_eval < 1:
            raise ConfigError(f"dataset 'organism': {n} problems leave none to train on; raise dataset_limit")
        return tuple(
            datasets.Dataset.from_list(tasks.records(tokenizer, count, split, request.seed))
            for count, split in ((n - n_eval, "train"), (n_eval, "eval"))
        )
    if kind == "statements":
        return statement_splits(request.spec, tokenizer, request.limit, request.eval_fraction, request.max_length)
    return split_by_task(_whole(request, tokenizer), request.eval_fraction, seed=request.seed)
