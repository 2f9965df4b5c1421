"""Shared types for sources: :class:`Problem` (a task with its gold answer) and :class:`SourceResult`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


@dataclass
class SourceResult:
    """What a loader read: ``items`` (problems or record dicts) and ``rejected`` rows (with skip_invalid)."""

    items: list = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def convert_rows(
    rows: Iterable[dict], convert: Callable[[int, dict], list], skip_invalid: bool, row_id: Callable[[int, dict], str]
) -> SourceResult:
    """Apply ``convert(index, row) -> list of items`` to each row; a :class:`RecordError` (or a missing
    key) raises, or with ``skip_invalid`` is collected with the row."""
    result = SourceResult()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise RecordError(row_id(i, {}), "<row>", f"expected an object, got {type(row).__name__}")
            result.items.extend(convert(i, row))
        except RecordError as e:
            if not skip_invalid:
                raise
            result.rejected.append(Rejected(e.row_id, e.field, e.message, row))
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
