"""Shared types for sources: :class:`Problem` (a task with its gold answer) and :class:`SourceResult`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..io import SKIPPED
from ..schema import SCENARIOS, RecordError, Rejected

__all__ = ["Problem", "SourceResult", "convert_rows"]


@dataclass
class Problem:
    """A task to be answered: ``gold`` is the normalised final answer ("" for safety prompts).

    ``solution`` is a reference worked solution when the source has one; ``meta`` is a plain dict.
    """

    id: str
    task: str
    gold: str
    source: str
    scenario: str = "math"
    solution: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.id:
            raise RecordError(self.id, "id", "empty id")
        if not isinstance(self.task, str) or not self.task.strip():
            raise RecordError(self.id, "task", "empty or not a string")
        if self.scenario not in SCENARIOS:
            raise RecordError(self.id, "scenario", f"must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.scenario == "math" and not self.gold:
            raise RecordError(self.id, "gold", "a math problem needs a gold answer")
        if self.scenario == "statement":  # nothing to answer: no candidates to make or sample
            raise RecordError(
                self.id, "scenario", "a statement is judged as it stands, not answered: make statement records directly"
            )


@dataclass
class SourceResult:
    """What a loader read: ``items`` (problems or record dicts) and ``rejected`` rows (with skip_invalid).

    ``n_read``: source entries read (lines / rows, bad ones included); ``n_converted``: entries turned
    into items (an entry can give several records, or none when all of them were rejected). The
    entries rejected as a whole have ``unit="entry"``; one bad record of an entry, ``unit="record"``.
    None when the loader did not count.
    """

    items: list = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    n_read: int | None = None
    n_converted: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def extend(self, other: SourceResult) -> None:
        """Add another result's items, rejects and counts (several files of one source)."""
        self.items.extend(other.items)
        self.rejected.extend(other.rejected)
        self.n_read = (self.n_read or 0) + (other.n_read or 0)
        self.n_converted = (self.n_converted or 0) + (other.n_converted or 0)


def convert_rows(
    rows: Iterable[dict],
    convert: Callable[[int, dict], list],
    skip_invalid: bool,
    row_id: Callable[[int, dict], str],
    rejected: Iterable[Rejected] = (),
) -> SourceResult:
    """Apply ``convert(index, row) -> list of items`` to each row; a :class:`RecordError` (or a missing
    key) raises, or with ``skip_invalid`` is collected with the row (``unit="entry"``).

    ``convert`` may return :class:`Rejected` items among its items: one bad record of an entry whose
    other records are fine (``unit="record"``); they raise like an error without ``skip_invalid``,
    and with it are collected while the entry's good records are kept. ``rows`` may hold
    :data:`~loopalign.data.io.SKIPPED` for entries already rejected by the reader (``rejected``).
    """
    result = SourceResult(rejected=list(rejected), n_read=0, n_converted=0)
    for i, row in enumerate(rows):
        result.n_read += 1
        if row is SKIPPED:
            continue
        try:
            if not isinstance(row, dict):
                raise RecordError(row_id(i, {}), "<row>", f"expected an object, got {type(row).__name__}")
            produced = convert(i, row)
        except RecordError as e:
            if not skip_invalid:
                raise
            result.rejected.append(Rejected(e.row_id, e.field, e.message, row, unit="entry"))
            continue
        bad = [x for x in produced if isinstance(x, Rejected)]
        if bad and not skip_invalid:
            raise RecordError(bad[0].row_id, bad[0].field, bad[0].error)
        result.items.extend(x for x in produced if not isinstance(x, Rejected))
        result.rejected.extend(bad)
        result.n_converted += 1
    return result


def require(row: dict, rid: str, name: str, types=(str,)) -> object:
    """``row[name]``, checked present, of ``types`` and (strings) non-empty; else :class:`RecordError`."""
    if name not in row or row[name] is None:
        raise RecordError(rid, name, "missing")
    value = row[name]
    if not isinstance(value, types):
        raise RecordError(rid, name, f"expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise RecordError(rid, name, "empty")
    return value
