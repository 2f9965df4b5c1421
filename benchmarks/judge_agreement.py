"""A model judge's agreement with the hand labels of the grader's table (docs/introspection.md, "Grading").

    python benchmarks/judge_agreement.py [--model smollm2-135m] [--out judge_agreement.json]

Grades every labelled row of ``tests/introspection/test_grader_table.py`` (see ``benchmarks/grader_table.py``) with
``model_judge`` on the named model and with the rules, and prints, for each, the share of rows whose detection and
whose identification match the hand label, with 95% Wilson intervals over the rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("judge_agreement")


def _rows():
    spec = importlib.util.spec_from_file_location("grader_table_script", ROOT / "benchmarks" / "grader_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grader_table_script"] = module
    spec.loader.exec_module(module)
    return module.rows()


def agreement(grade, rows) -> dict:
    """{"detection"|"identification": {"rate", "lo", "hi", "n"}} of ``grade(text, trial)`` against the labels."""
    from loopalign.eval.metrics import wilson_interval

    hits = {"detection": 0, "identification": 0}
    for _, text, concept, trial_type, detected, identified in rows:
        g = grade(text, {"trial_type": trial_type, "concept": concept})
        hits["detection"] += g.detected == detected
        hits["identification"] += g.identified == identified
    out = {}
    for name, k in hits.items():
        lo, hi = wilson_interval(k, len(rows), 0.05)
        out[name] = {"rate": k / len(rows), "lo": float(lo), "hi": float(hi), "n": len(rows)}
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the judge's model (any name load_model takes)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = make_parser().parse_args(argv)
    from loopalign.eval.introspection import grade_response
    from loopalign.eval.introspection.judges import model_judge
    from loopalign.loading import load_model

    rows = _rows()
    model, tok = load_model(args.model, device="cpu")
    judge = model_judge(model, tok)
    result = {
        "model": args.model,
        "rows": len(rows),
        "judge": agreement(lambda text, trial: grade_response(text, trial, judge), rows),
        "rules": agreement(lambda text, trial: grade_response(text, trial), rows),
    }
    lines = ["| grader | detection agrees | identification agrees | rows |", "|---|---|---|---|"]
    for name in ("judge", "rules"):
        d, i = result[name]["detection"], result[name]["identification"]
        label = f"model_judge({args.model})" if name == "judge" else "rules"
        lines.append(
            f"| {label} | {100 * d['rate']:.1f} [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}] "
            f"| {100 * i['rate']:.1f} [{100 * i['lo']:.1f}, {100 * i['hi']:.1f}] | {len(rows)} |"
        )
    logger.info("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
