"""MATH problems (Hendrycks et al.): rows ``{"problem", "solution", "level"?, "type"?}``, answer in ``\\boxed{}``."""

from __future__ import annotations

from ..io import read_entries
from ..schema import RecordError
from ..verifiers import extract_boxed, normalize_answer
from .base import Problem, SourceResult, convert_rows, require

__all__ = ["load_math"]


def load_math(
    path_or_name: str = "HuggingFaceH4/MATH-500",
    split: str = "test",
    limit: int | None = None,
    skip_invalid: bool = False,
    config: str | None = None,
) -> SourceResult:
    """MATH problems from a local file or the hub -> SourceResult of Problems (ids ``math-{split}-{row}``).

    ``gold`` is the normalised content of the last ``\\boxed{}`` (a number when it is one, else LaTeX text).
    """
    rows, bad = read_entries(path_or_name, split=split, config=config, limit=limit, skip_invalid=skip_invalid)

    def row_id(i, row):
        return f"math-{row['unique_id']}" if row.get("unique_id") else f"math-{split}-{i}"

    def convert(i, row):
        rid = row_id(i, row)
        problem = require(row, rid, "problem")
        solution = require(row, rid, "solution")
        boxed = extract_boxed(solution)
        gold = normalize_answer(boxed) if boxed is not None else None
        if not gold:
            raise RecordError(rid, "solution", "no \\boxed{...} final answer")
        meta = {"row": i, "level": row.get("level"), "type": row.get("type") or row.get("subject"), "boxed": boxed}
        return [Problem(rid, problem, gold, "math", "math", solution, meta)]

    return convert_rows(rows, convert, skip_invalid, row_id, bad)
