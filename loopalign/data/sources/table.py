"""A user's own labelled data from a JSONL or CSV file, with a column map: no Python needed.

The column map names, for each record field, the file's column that holds it::

    task=question,answer=response,label=is_correct[,gold=reference][,cluster=topic][,id=uid]   (math / safety)
    statement=claim,label=truth[,cluster=subject][,id=uid]                                   (statement)

- ``label``: 1/0, true/false, yes/no, correct/incorrect (any case; CSV cells are text) -> 1/0;
  anything else rejects the row naming the column.
- ``statement`` makes ``statement`` records (the claim is the record's ``answer``); its ``cluster``
  column becomes the record's ``task`` (the cluster id every consumer groups by), or, without one,
  the statement itself (each claim its own cluster).
- ``task``/``answer`` make ``math`` records (a ``gold`` column needed: the math scenario's records
  carry their reference answer) or, with ``scenario="safety"``, safety records. Their ``task`` is
  their cluster (all answers to one task side by side); a ``cluster`` column is kept in
  ``meta["cluster"]``.
- ``id``: the record id (unique); default ``<file stem>:<line>``.

Every other column goes to ``meta`` (with ``row``, the entry's 1-based number in the file), so nothing
the file holds is lost; ``parse_status`` is "na" (the file's labels are taken as given). A bad row
raises :class:`~loopalign.data.schema.RecordError` naming the row and the column, or with
``skip_invalid`` is returned as rejected (``unit="entry"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from ..io import SourceError, read_entries
from ..schema import RecordError, make_record
from .base import SourceResult, convert_rows

__all__ = ["ColumnMap", "parse_column_map", "load_table", "TRUE_LABELS", "FALSE_LABELS"]

TRUE_LABELS = ("1", "true", "yes", "correct", "right")
FALSE_LABELS = ("0", "false", "no", "incorrect", "wrong")


@dataclass(frozen=True)
class ColumnMap:
    """For each record field, the file's column that holds it (None: not in the file)."""

    label: str | None = None
    task: str | None = None
    answer: str | None = None
    statement: str | None = None
    gold: str | None = None
    cluster: str | None = None
    id: str | None = None

    @property
    def scenario_kind(self) -> str:
        return "statement" if self.statement else "task"

    def check(self, scenario: str) -> None:
        """The map fits ``scenario`` ("math", "safety" or "statement"); a ValueError names what is missing."""
        if not self.label:
            raise ValueError("columns: map the label column (label=COLUMN)")
        if self.statement:
            if self.task or self.answer or self.gold:
                raise ValueError(
                    "columns: a statement map (statement=COLUMN) takes no task, answer or gold column; "
                    "the statement is the record's answer, its cluster column its task"
                )
            if scenario != "statement":
                raise ValueError(f"scenario {scenario!r} does not take a statement column; use scenario 'statement'")
            return
        if scenario == "statement":
            raise ValueError("columns: scenario 'statement' needs statement=COLUMN")
        if not (self.task and self.answer):
            raise ValueError("columns: map task=COLUMN and answer=COLUMN (or statement=COLUMN for single claims)")
        if scenario == "math" and not self.gold:
            raise ValueError(
                "columns: math records need their reference answer (gold=COLUMN); without one use scenario 'safety' "
                "(the response-appropriate template) or map single claims with statement=COLUMN"
            )
        if scenario not in ("math", "safety"):
            raise ValueError(f"scenario must be 'math', 'safety' or 'statement', got {scenario!r}")

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


def parse_column_map(spec: str | dict | ColumnMap) -> ColumnMap:
    """``"task=question,answer=response,label=ok"`` (or a dict, or a ColumnMap) -> :class:`ColumnMap`; a
    ValueError names an unknown field, a pair without ``=`` or a field given twice."""
    if isinstance(spec, ColumnMap):
        return spec
    known = [f.name for f in fields(ColumnMap)]
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = []
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            field, eq, column = (x.strip() for x in part.partition("="))
            if not eq or not field or not column:
                raise ValueError(f"columns: expected FIELD=COLUMN pairs separated by commas, got {part!r}")
            pairs.append((field, column))
    seen: dict[str, str] = {}
    for field, column in pairs:
        if field not in known:
            raise ValueError(f"columns: unknown field {field!r} (fields: {', '.join(known)})")
        if field in seen:
            raise ValueError(f"columns: field {field!r} mapped twice")
        seen[field] = str(column)
    return ColumnMap(**seen)


def _label(value, rid: str, column: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in TRUE_LABELS:
        return 1
    if text in FALSE_LABELS:
        return 0
    raise RecordError(rid, column, f"label must be one of 1/0, true/false, yes/no, correct/incorrect (got {value!r})")


def _text(row: dict, rid: str, column: str) -> str:
    if column not in row or row[column] is None:
        raise RecordError(rid, column, "missing")
    value = row[column]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecordError(rid, column, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(rid, column, "empty")
    return value


def load_table(
    path: str | os.PathLike,
    columns,
    scenario: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
    source: str | None = None,
) -> SourceResult:
    """Verification records from a ``.jsonl`` or ``.csv`` file with a column map (see the module doc).

    ``scenario``: "math" (default for task/answer maps), "safety" or "statement" (default for statement
    maps). ``source``: the records' ``source`` (default the file's name). The map is checked against the
    file's columns (the first row) before any row is converted."""
    path = Path(path)
    cmap = parse_column_map(columns)
    scenario = scenario or ("statement" if cmap.statement else "math")
    cmap.check(scenario)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise SourceError(f"{path}: expected a .jsonl or .csv file, got {path.suffix or 'no suffix'!r}")
    rows, rejected = read_entries(str(path), limit=limit, skip_invalid=skip_invalid)
    first = next((r for r in rows if isinstance(r, dict)), None)
    if first is not None:
        absent = [c for c in cmap.as_dict().values() if c not in first]
        if absent:
            raise ValueError(
                f"columns: {path.name} has no column {absent[0]!r} (its columns: {', '.join(map(str, first))})"
            )
    mapped = set(cmap.as_dict().values())
    source = source or path.name

    def row_id(i: int, row: dict) -> str:
        if cmap.id and row.get(cmap.id) not in (None, ""):
            return str(row[cmap.id])
        return f"{path.stem}:{i + 1}"  # the entry's number (a JSONL line, a CSV row)

    def convert(i: int, row: dict) -> list:
        rid = row_id(i, row)
        if row.get(cmap.label) in (None, ""):
            raise RecordError(rid, cmap.label, "missing")
        label = _label(row[cmap.label], rid, cmap.label)
        meta = {k: v for k, v in row.items() if k not in mapped}
        meta["row"] = i + 1
        if cmap.statement:
            statement = _text(row, rid, cmap.statement)
            task = _text(row, rid, cmap.cluster) if cmap.cluster else statement
            return [make_record(rid, task, "", statement, label, source, "statement", "na", meta)]
        if cmap.cluster:
            meta["cluster"] = _text(row, rid, cmap.cluster)
        task, answer = _text(row, rid, cmap.task), _text(row, rid, cmap.answer)
        gold = _text(row, rid, cmap.gold) if cmap.gold else ""
        return [make_record(rid, task, gold, answer, label, source, scenario, "na", meta)]

    # rows the reader skipped keep their place (SKIPPED), so the i of convert is the entry's number in the file
    return convert_rows(rows, convert, skip_invalid, row_id, rejected)
