"""An ablation's tables, regenerated from its ``ablation.json`` (written by ``loopalign ablate-gap``; docs/organism.md
quotes ``docs/figures/ablate_gap_organism_rule_v2.json``): the same text as the run's ``ablation.md``.

    python benchmarks/ablation_table.py outputs/ablate_gap/ablation.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loopalign.eval.ablation import ablation_markdown, rule_markdown


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation_json", help="an ablate-gap run's ablation.json")
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    return parser


def table(saved: dict) -> str:
    """The markdown of ``ablation.md`` from the parsed ``ablation.json``."""
    text = ablation_markdown(saved["rows"], saved["depth"])
    if saved.get("rule"):
        text += "\n".join(rule_markdown(saved["rule"])) + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    text = table(json.loads(Path(args.ablation_json).read_text()))
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
