"""Nameability of the held-out concepts: does injecting a concept's vector make a model say its word?

    python benchmarks/nameability.py --model introspection_organism nameable_organism \
        --out docs/figures/runs/nameable_organism/nameability.json

For each model (a named model or a folder :func:`loopalign.loading.load_model` reads): the 12 concepts the
introspection recipes hold out (``split_concepts``), vectors extracted at the last loop and the default vector layer,
injected norm-matched at strengths 0.5, 1, 2 and 4 into a neutral request no build trains on and into the trial
transcript; greedy replies; a trial names the concept when it is the first of the 149 protocol words the reply names
(:mod:`loopalign.eval.introspection.nameability`). Prints one row per model and context; ``--out`` writes the JSON
(rates, Wilson intervals, by strength, first replies) the docs quote; ``--from-json`` prints a written JSON's table.
"""

from __future__ import annotations

import argparse
import json
import sys

from loopalign.io import atomic_write_text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", nargs="+", help="named models or folders (looped, the protocol's)")
    source.add_argument("--from-json", default=None, help="print the table of a JSON this script wrote (no model)")
    parser.add_argument("--strengths", default="0.5,1,2,4", help="norm-matched strengths (fractions of the site norm)")
    parser.add_argument("--out", default=None, help="write the JSON here (with --model)")
    return parser


def table_lines(results: dict) -> list[str]:
    """One row per (model, context): the rate named with its Wilson interval, the rate per strength, n."""
    strengths = next(iter(next(iter(results.values())).values()))["by_strength"]
    lines = [
        f"| model | context | named (95% Wilson) | by strength {' / '.join(strengths)} | n |",
        "|---|---|---|---|---|",
    ]
    for name, contexts in results.items():
        for context, r in contexts.items():
            lo, hi = r["interval"]
            by = " / ".join(f"{100 * v:.0f}" for v in r["by_strength"].values())
            lines.append(
                f"| {name} | {context} | {100 * r['rate']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {by} | {r['n']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: --from-json {args.from_json}: {e}") from None
    else:
        try:
            strengths = tuple(float(x) for x in args.strengths.split(","))
        except ValueError:
            raise SystemExit(f"error: --strengths must be comma-separated numbers, got {args.strengths!r}") from None
        if any(not s > 0 for s in strengths):
            raise SystemExit(f"error: --strengths must be > 0, got {args.strengths!r}")
        import loopalign  # noqa: F401  (registers the named organisms)
        from loopalign.loading import load_model
        from loopalign.organism.nameable import held_out_nameability

        results = {}
        for name in args.model:
            model, tokenizer = load_model(name)
            results[name] = held_out_nameability(model, tokenizer, strengths)
        if args.out:
            atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    sys.stdout.write("\n".join(table_lines(results)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
