"""GSM8K problems and OpenAI's example model solutions (real (task, answer, correct?) triples).

- ``test.jsonl`` rows ``{"question", "answer"}``; the answer ends ``#### N``.
- ``example_model_solutions.jsonl`` rows ``{"question", "ground_truth", <model>: {"is_correct", "solution"}}``
  for the four models in :data:`SOLUTION_MODELS`; solutions end ``A: N``. Each (problem, model)
  becomes one verification record labelled with the file's own ``is_correct``; our verifier's
  extraction is stored in ``meta`` (``extracted``, ``verifier_label``) and sets ``parse_status``.
"""

from __future__ import annotations

import re

from ..io import read_entries
from ..schema import RecordError, Rejected, make_record
from ..verifiers import extract_answer, verify_math
from .base import Problem, SourceResult, convert_rows, require

__all__ = ["SOLUTION_MODELS", "load_gsm8k", "load_gsm8k_solutions", "last_operation"]

SOLUTION_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
_CALC = re.compile(r"<<\s*(-?[\d.]+)\s*([-+*/])\s*(-?[\d.]+)\s*=\s*(-?[\d.]+)\s*>>")


def last_operation(solution: str, gold: str) -> list | None:
    """``[a, op, b]`` of the last calculator annotation ``<<a op b=c>>`` when it is binary and c == gold."""
    found = _CALC.findall(solution)
    if not found:
        return None
    a, op, b, c = found[-1]
    value = extract_answer(c).value
    return [a, op, b] if value == gold else None


def load_gsm8k(
    path_or_name: str = "openai/gsm8k",
    split: str = "test",
    limit: int | None = None,
    skip_invalid: bool = False,
    config: str | None = "main",
) -> SourceResult:
    """GSM8K problems from a local JSONL/parquet file or the hub (``config``/``split``) -> SourceResult of Problems.

    ids ``gsm8k-{split}-{row}``; ``gold`` is the normalised ``#### N``; ``meta`` has ``row`` and ``last_op``.
    """
    rows, bad = read_entries(path_or_name, split=split, config=config, limit=limit, skip_invalid=skip_invalid)

    def row_id(i, row):
        return f"gsm8k-{split}-{i}"

    def convert(i, row):
        rid = row_id(i, row)
        question = require(row, rid, "question")
        answer = require(row, rid, "answer")
        if "####" not in answer:
            raise RecordError(rid, "answer", "no '#### N' final answer")
        gold = extract_answer(answer, lenient=False)
        if gold.value is None:
            raise RecordError(rid, "answer", f"cannot parse the final answer {gold.raw!r}")
        meta = {"row": i, "last_op": last_operation(answer, gold.value)}
        return [Problem(rid, question, gold.value, "gsm8k", "math", answer, meta)]

    return convert_rows(rows, convert, skip_invalid, row_id, bad)


def load_gsm8k_solutions(
    path: str, limit: int | None = None, skip_invalid: bool = False, models: tuple[str, ...] = SOLUTION_MODELS
) -> SourceResult:
    """Verification records from ``example_model_solutions.jsonl``: one per (problem, model) -> 4 x rows.

    A bad model answer rejects that record only (``unit="record"``); the entry's other answers are kept.

    ids ``gsm8k-sol-{row}-{model}``; label = the file's ``is_correct``; parse_status from our extraction.
    """
    rows, bad = read_entries(path, limit=limit, skip_invalid=skip_invalid)

    def row_id(i, row):
        return f"gsm8k-sol-{i}"

    def convert(i, row):
        rid = row_id(i, row)
        question = require(row, rid, "question")
        truth = require(row, rid, "ground_truth")
        gold = extract_answer(truth, lenient=False)
        if gold.value is None:
            raise RecordError(rid, "ground_truth", "no final answer ('A: N' or '#### N')")
        out = []
        for model in models:
            mid = f"{rid}-{model}"
            entry = row.get(model)
            try:
                if not isinstance(entry, dict):
                    raise RecordError(mid, model, "missing model entry (expected {'is_correct', 'solution'})")
                solution = require(entry, mid, "solution")
                correct = entry.get("is_correct")
                if not isinstance(correct, bool):
                    raise RecordError(mid, f"{model}.is_correct", f"expected a bool, got {correct!r}")
            except RecordError as e:  # this model's answer only: the other models' answers stay
                sibling = {"question": question, "ground_truth": truth, model: entry}
                out.append(Rejected(e.row_id, e.field, e.message, sibling, unit="record"))
                continue
            verdict = verify_math(solution, gold.value)
            meta = {
                "row": i,
                "model": model,
                "extracted": verdict.extracted,
                "verifier_label": verdict.label if verdict.parse_status == "ok" else None,
            }
            out.append(
                make_record(
                    mid,
                    question,
                    gold.value,
                    solution,
                    int(correct),
                    "gsm8k-solutions",
                    "math",
                    verdict.parse_status,
                    meta,
                )
            )
        return out

    return convert_rows(rows, convert, skip_invalid, row_id, bad)
