"""The introspection rule grader on its labelled table (docs/introspection.md, "Grading"), per failure class.

    python benchmarks/grader_table.py [--rev GIT_REVISION]

Reads the table from ``tests/introspection/test_grader_table.py`` (``TABLE``: the first grader's rows, and
``TABLE_BY_CLASS``: rows grouped by the failure classes of issue #29) and prints, per class, how many rows the
current grader grades as labelled (detected, identified); with ``--rev``, also the grader of
``loopalign/eval/introspection/grading.py`` at that git revision (e.g. the one before the rewrite, 29f61ed).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("grader_table")


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def grader_at(rev: str):
    """``rules_grade`` of grading.py at git revision ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:loopalign/eval/introspection/grading.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    (folder / "grading_at_rev.py").write_text(source)
    return _module("grading_at_rev", folder / "grading_at_rev.py").rules_grade


def rows() -> list[tuple[str, str, str, str, bool, bool]]:
    """(class, response, concept, trial type, detected, identified) of every labelled row."""
    table = _module("grader_table_rows", ROOT / "tests" / "introspection" / "test_grader_table.py")
    first = [("first table", text, concept, "injection", d, i) for text, concept, d, i in table.TABLE]
    return first + list(table.TABLE_BY_CLASS)


def scores(rules_grade, labelled) -> Counter:
    right = Counter()
    for kind, text, concept, trial_type, detected, identified in labelled:
        g = rules_grade(text, concept or None, trial_type)
        right[kind] += (g.detected, g.identified) == (detected, identified)
    return right


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="also grade with grading.py at this git revision")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = make_parser().parse_args(argv)
    from loopalign.eval.introspection import rules_grade

    labelled = rows()
    sizes = Counter(kind for kind, *_ in labelled)
    graders = {"current": scores(rules_grade, labelled)}
    if args.rev:
        graders[args.rev] = scores(grader_at(args.rev), labelled)
    header = "| class | rows | " + " | ".join(graders) + " |"
    lines = [header, "|---|---|" + "---|" * len(graders)]
    for kind in sizes:
        lines.append(f"| {kind} | {sizes[kind]} | " + " | ".join(str(g[kind]) for g in graders.values()) + " |")
    total = sum(sizes.values())
    lines.append(f"| all | {total} | " + " | ".join(str(sum(g.values())) for g in graders.values()) + " |")
    logger.info("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
