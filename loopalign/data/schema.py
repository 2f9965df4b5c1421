"""Record schemas and validation for verification records, rendered records and injection trials.

A verification record (one candidate answer A to one task, with the verifier's label):

    id        str   unique within a build
    task      str   the question (math), the user request (safety), or the entity a statement is
                    about (statement; see below)
    gold      str   the normalised gold final answer; "" when there is none (safety)
    answer    str   the candidate answer text A (statement: the statement itself)
    label     int   1 = verifier says correct / appropriate (statement: the statement is true), 0 = not
    source    str   where the record came from (e.g. "gsm8k-solutions", "synthetic", "statements-capital")
    meta      str   a JSON-encoded dict (free-form provenance)
    scenario  str   "math" | "safety" | "statement"
    parse_status str  "ok" (answer parsed), "unparsed" (no final answer could be read: its own
                    category, counted in build reports, never silently "wrong"), "na" (no parsing
                    involved, e.g. safety, statement)

A ``statement`` record is one claim judged true or false on its own ("Paris is a city in France."),
mapped onto the same fields so that every consumer of records (rendering, evaluation, training,
bootstrap clusters, the split by task) handles it unchanged:

- ``answer``: the statement; its last token is ``answer_end_index`` (where probes read), as the end of
  a candidate answer is for math;
- ``task``: a request about the statement's entity ("Tell me about the city of Paris."), the same
  text for every statement about that entity in every family: it is the cluster id, so probe folds,
  bootstrap clusters and ``split_by_task`` never split an entity (the prompt does not show it);
- ``gold``: the true value of the relation for the entity ("France"), "" where there is none
  (generated numeric comparisons);
- ``label``: 1 = the statement is true; ``parse_status``: "na";
- ``meta``: at least ``family`` (e.g. "city_country"), ``entity``, ``split`` ("train" / "eval", by
  entity) and ``negated`` (see :mod:`loopalign.data.sources.statements`).

A rendered record adds ``prompt`` (str), ``input_ids`` (list[int]), ``verdict_index`` (int, last
prompt token), ``answer_end_index`` (int, last token of A) and ``probe_indices`` ([answer_end_index,
verdict_index]). An injection trial has the fields in :data:`TRIAL_FIELDS`.

Every check raises :class:`RecordError`, which names the record id and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from loopalign.errors import DataError

__all__ = [
    "RecordError",
    "SCENARIOS",
    "PARSE_STATUSES",
    "VERIFICATION_FIELDS",
    "RENDERED_FIELDS",
    "TRIAL_FIELDS",
    "TRIAL_TYPES",
    "UNITS",
    "Rejected",
    "Dropped",
    "ValidationResult",
    "validate_record",
    "validate_trial",
    "validate_records",
    "make_record",
    "meta_dict",
]

SCENARIOS = ("math", "safety", "statement")
PARSE_STATUSES = ("ok", "unparsed", "na")
TRIAL_TYPES = ("injection", "control")

VERIFICATION_FIELDS: dict[str, type] = {
    "id": str,
    "task": str,
    "gold": str,
    "answer": str,
    "label": int,
    "source": str,
    "meta": str,
    "scenario": str,
    "parse_status": str,
}
RENDERED_FIELDS: dict[str, type] = {
    **VERIFICATION_FIELDS,
    "prompt": str,
    "input_ids": list,
    "verdict_index": int,
    "answer_end_index": int,
    "probe_indices": list,
}
TRIAL_FIELDS: dict[str, type] = {
    "id": str,
    "concept": str,
    "extraction_loop": int,
    "injection_loop": int,
    "layer": int,
    "strength": float,
    "injected": bool,
    "trial_type": str,
    "prompt": str,
    "input_ids": list,
    "injection_start": int,
    "num_loops": int,
}


class RecordError(DataError):
    """A bad record: ``row_id`` and ``field`` name what is wrong."""

    def __init__(self, row_id, field: str, message: str):
        self.row_id, self.field, self.message = row_id, field, message
        super().__init__(f"record {row_id!r}, field {field!r}: {message}")


def _row_id(row) -> object:
    return row.get("id", "<no id>") if isinstance(row, dict) else "<not a dict>"


def _check_types(row: dict, fields: dict[str, type]) -> None:
    rid = _row_id(row)
    if not isinstance(row, dict):
        raise RecordError(rid, "<row>", f"a record must be a dict, got {type(row).__name__}")
    for name, typ in fields.items():
        if name not in row:
            raise RecordError(rid, name, "missing")
        value = row[name]
        if typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, typ)
        if not ok:
            raise RecordError(rid, name, f"expected {typ.__name__}, got {type(value).__name__} ({value!r:.60})")
    extra = sorted(set(row) - set(fields))
    if extra:
        raise RecordError(rid, extra[0], f"unknown field (allowed: {sorted(fields)})")


def _check_token_ids(rid, row: dict, name: str = "input_ids") -> None:
    ids = row[name]
    if not ids:
        raise RecordError(rid, name, "empty token list")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise RecordError(rid, name, "must be a list of non-negative ints")


def validate_record(row: dict, rendered: bool | None = None) -> dict:
    """Check a verification record (``rendered``: also the prompt fields; None: decide by the keys).

    Returns the row unchanged; raises :class:`RecordError` naming id and field.
    """
    if rendered is None:
        rendered = isinstance(row, dict) and "prompt" in row
    _check_types(row, RENDERED_FIELDS if rendered else VERIFICATION_FIELDS)
    rid = row["id"]
    if not rid.strip():
        raise RecordError(rid, "id", "empty id")
    if not row["task"].strip():
        raise RecordError(rid, "task", "empty task")
    if row["label"] not in (0, 1):
        raise RecordError(rid, "label", f"must be 0 or 1, got {row['label']!r}")
    if row["scenario"] not in SCENARIOS:
        raise RecordError(rid, "scenario", f"must be one of {SCENARIOS}, got {row['scenario']!r}")
    if row["parse_status"] not in PARSE_STATUSES:
        raise RecordError(rid, "parse_status", f"must be one of {PARSE_STATUSES}, got {row['parse_status']!r}")
    if row["scenario"] == "math" and not row["gold"].strip():
        raise RecordError(rid, "gold", "a math record needs a gold answer")
    if row["scenario"] == "statement" and row["parse_status"] != "na":
        raise RecordError(
            rid, "parse_status", f"a statement record is not parsed: must be 'na', got {row['parse_status']!r}"
        )
    if not row["answer"].strip():
        raise RecordError(rid, "answer", "empty candidate answer")
    if not row["source"].strip():
        raise RecordError(rid, "source", "empty source")
    try:
        meta = json.loads(row["meta"])
    except json.JSONDecodeError as e:
        raise RecordError(rid, "meta", f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RecordError(rid, "meta", f"must encode a JSON object, got {type(meta).__name__}")
    if rendered:
        _check_token_ids(rid, row)
        n = len(row["input_ids"])
        if row["verdict_index"] != n - 1:
            raise RecordError(
                rid, "verdict_index", f"must be the last prompt token ({n - 1}), got {row['verdict_index']}"
            )
        if not 0 <= row["answer_end_index"] < row["verdict_index"]:
            raise RecordError(
                rid,
                "answer_end_index",
                f"must be in [0, verdict_index={row['verdict_index']}), got {row['answer_end_index']}",
            )
        if row["probe_indices"] != [row["answer_end_index"], row["verdict_index"]]:
            raise RecordError(rid, "probe_indices", "must be [answer_end_index, verdict_index]")
        if not row["prompt"]:
            raise RecordError(rid, "prompt", "empty prompt")
    return row


def validate_trial(row: dict) -> dict:
    """Check an injection trial record; raises :class:`RecordError` naming id and field."""
    _check_types(row, TRIAL_FIELDS)
    rid = row["id"]
    _check_token_ids(rid, row)
    if row["trial_type"] not in TRIAL_TYPES:
        raise RecordError(rid, "trial_type", f"must be one of {TRIAL_TYPES}, got {row['trial_type']!r}")
    if row["injected"] != (row["trial_type"] == "injection"):
        raise RecordError(
            rid, "injected", f"must be {row['trial_type'] == 'injection'} for a {row['trial_type']} trial"
        )
    if not 0 <= row["injection_start"] < len(row["input_ids"]):
        raise RecordError(rid, "injection_start", f"out of range for {len(row['input_ids'])} tokens")
    if row["num_loops"] < 1:
        raise RecordError(rid, "num_loops", f"must be >= 1, got {row['num_loops']}")
    if row["injected"]:
        if not row["concept"]:
            raise RecordError(rid, "concept", "an injection trial needs a concept")
        for name in ("extraction_loop", "injection_loop", "layer"):
            if row[name] < 0:
                raise RecordError(rid, name, f"must be >= 0 for an injection trial, got {row[name]}")
        for name in ("extraction_loop", "injection_loop"):
            if row[name] >= row["num_loops"]:
                raise RecordError(rid, name, f"loop {row[name]} out of range for num_loops={row['num_loops']}")
        if row["strength"] <= 0:
            raise RecordError(rid, "strength", f"must be > 0 for an injection trial, got {row['strength']}")
    elif row["strength"] != 0:
        raise RecordError(rid, "strength", "a control trial has strength 0")
    return row


#: units of the build accounting: a source entry (a line of a JSONL file, a row of a table, a
#: synthetic problem) and a record (one candidate answer; an entry can give several)
UNITS = ("entry", "record")


def _without_details(message: str) -> str:
    """``message`` less a trailing `` (...)`` group (nested parentheses allowed): "not valid JSON (at char 4)"
    -> "not valid JSON"."""
    if not message.endswith(")"):
        return message
    depth = 0
    for i in range(len(message) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(message[i], 0)
        if depth == 0:
            return message[: i - 1] if i > 0 and message[i - 1] == " " else message
    return message


def _jsonable(row):
    return row if isinstance(row, (dict, list, str, int, float, bool, type(None))) else repr(row)


@dataclass
class Rejected:
    """A row that failed validation: its id, the field, the message and the row itself.

    ``unit``: "entry" (a whole source entry: its records were never made) or "record" (one
    record); ``line``: the 1-based line of the source file, when known.
    """

    row_id: object
    field: str
    error: str
    row: object
    unit: str = "record"
    line: int | None = None

    @property
    def reason(self) -> str:
        """``field: message`` without a closing ``(details)`` group: the key rejects are counted by."""
        return f"{self.field}: {_without_details(self.error)}"

    def to_dict(self) -> dict:
        out = {"id": str(self.row_id), "field": self.field, "error": self.error, "unit": self.unit}
        if self.line is not None:
            out["line"] = self.line
        out["row"] = _jsonable(self.row)
        return out


@dataclass
class Dropped:
    """A valid entry or record left out on purpose (``--balance``, ``--dedupe``, no wrong answer
    possible, an unparsed sample), with the ``reason``; written to ``dropped.jsonl``."""

    row_id: object
    unit: str
    reason: str
    row: object = None

    def to_dict(self) -> dict:
        return {"id": str(self.row_id), "unit": self.unit, "reason": self.reason, "row": _jsonable(self.row)}


@dataclass
class ValidationResult:
    """Valid rows and (with ``skip_invalid``) the rejected ones."""

    rows: list[dict] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def validate_records(
    rows: Iterable[dict], kind: str = "verification", skip_invalid: bool = False, check_unique: bool = True
) -> ValidationResult:
    """Validate rows (``kind``: "verification", "rendered" or "trial"), and that ids are unique.

    Without ``skip_invalid`` the first bad row raises :class:`RecordError`; with it, bad rows are
    collected in ``rejected``.
    """
    checks = {
        "verification": lambda r: validate_record(r, rendered=False),
        "rendered": lambda r: validate_record(r, rendered=True),
        "trial": validate_trial,
    }
    if kind not in checks:
        raise ValueError(f"kind must be one of {sorted(checks)}, got {kind!r}")
    check = checks[kind]
    result = ValidationResult()
    seen: set[str] = set()
    for row in rows:
        try:
            check(row)
            if check_unique:
                if row["id"] in seen:
                    raise RecordError(row["id"], "id", "duplicate id")
                seen.add(row["id"])
        except RecordError as e:
            if not skip_invalid:
                raise
            result.rejected.append(Rejected(e.row_id, e.field, e.message, row))
            continue
        result.rows.append(row)
    return result


def make_record(
    id: str,
    task: str,
    gold: str,
    answer: str,
    label: int,
    source: str,
    scenario: str,
    parse_status: str,
    meta: dict | None = None,
) -> dict:
    """Build a verification record dict (``meta`` is JSON-encoded with sorted keys) and validate it."""
    row = {
        "id": id,
        "task": task,
        "gold": gold,
        "answer": answer,
        "label": int(label),
        "source": source,
        "meta": json.dumps(meta or {}, sort_keys=True, ensure_ascii=False),
        "scenario": scenario,
        "parse_status": parse_status,
    }
    return validate_record(row, rendered=False)


def meta_dict(row: dict) -> dict:
    """The decoded ``meta`` of a record."""
    return json.loads(row["meta"])
