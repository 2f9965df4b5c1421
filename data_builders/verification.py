"""Build a verification dataset: source -> candidates -> (dedupe, balance) -> (render) -> build folder.

    python -m data_builders.verification --source synthetic --n 200 --seed 0 --out DIR
    python -m data_builders.verification --source gsm8k-solutions \\
        --path /work/shared/data/gsm8k/example_model_solutions.jsonl --render --tokenizer local --out DIR
    python -m data_builders.verification --source xstest-completions \\
        --path /work/shared/data/xstest/model_completions --out DIR

Sources: ``synthetic``, ``gsm8k`` and ``math`` give problems, answered by ``--candidates controlled``
(gold + wrong answers; the default) or ``sampled`` (``--policy``); ``safety-prompts`` gives prompts
(sampled only); ``gsm8k-solutions``, ``xstest-completions`` and ``safety-pairs`` are already
(task, answer, label) records. ``--n``: the number of synthetic problems, else the rows read.
The output folder (see :mod:`data_builders.io`) has ``content_hash`` in ``metadata.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass

from .candidates import (
    ControlledConfig,
    SamplingConfig,
    balance_labels,
    controlled_candidates,
    deduplicate,
    sample_candidates,
)
from .io import save_build
from .prompts import DEFAULT_TEMPLATE, load_template, render_records
from .schema import RecordError
from .sources import (
    generate_problems,
    load_gsm8k,
    load_gsm8k_solutions,
    load_math,
    load_safety_pairs,
    load_safety_prompts,
    load_xstest_completions,
)
from .sources.base import Problem, SourceResult

__all__ = ["SOURCES", "VerificationBuild", "build_verification", "main"]

PROBLEM_SOURCES = ("synthetic", "gsm8k", "math", "safety-prompts")
RECORD_SOURCES = ("gsm8k-solutions", "xstest-completions", "safety-pairs")
SOURCES = PROBLEM_SOURCES + RECORD_SOURCES


@dataclass
class VerificationBuild:
    """All settings of a verification build (the CLI flags); validated on creation."""

    source: str
    out: str
    path: str | None = None
    n: int | None = None
    seed: int = 0
    levels: tuple[int, ...] = (1, 2, 3, 4)
    split: str = "test"
    field_map: str = "beavertails"
    candidates: str = "controlled"
    wrong_per_problem: int = 1
    policy: str | None = None
    policy_tokenizer: str | None = None
    num_loops: int | None = None
    n_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int | None = None
    batch_size: int = 8
    on_unparsed: str = "drop"
    balance: bool = False
    dedupe: bool = False
    render: bool = False
    tokenizer: str = "local"
    template: str | None = None
    max_length: int | None = None
    skip_invalid: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"--source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"--source {self.source} needs --path (a local file/folder or a hub dataset name)")
        if self.candidates not in ("controlled", "sampled"):
            raise ValueError(f"--candidates must be 'controlled' or 'sampled', got {self.candidates!r}")
        if self.source in PROBLEM_SOURCES and self.candidates == "sampled" and not self.policy:
            raise ValueError("--candidates sampled needs --policy (a model folder, hub name or 'tiny')")
        if self.source == "safety-prompts" and self.candidates != "sampled":
            raise ValueError("--source safety-prompts has no gold answers: use --candidates sampled with --policy")
        if self.source in RECORD_SOURCES and self.candidates == "sampled":
            raise ValueError(f"--source {self.source} already holds model answers; --candidates sampled does not apply")
        if self.n is not None and self.n < 0:
            raise ValueError(f"--n must be >= 0, got {self.n}")
        self.levels = tuple(int(x) for x in self.levels)


def _load_source(cfg: VerificationBuild) -> SourceResult:
    kw = {"limit": cfg.n, "skip_invalid": cfg.skip_invalid}
    if cfg.source == "synthetic":
        return SourceResult(items=generate_problems(cfg.n if cfg.n is not None else 200, cfg.seed, cfg.levels))
    if cfg.source == "gsm8k":
        return load_gsm8k(cfg.path, split=cfg.split, **kw)
    if cfg.source == "math":
        return load_math(cfg.path, split=cfg.split, **kw)
    if cfg.source == "safety-prompts":
        return load_safety_prompts(cfg.path, split=cfg.split, **kw)
    if cfg.source == "gsm8k-solutions":
        return load_gsm8k_solutions(cfg.path, **kw)
    if cfg.source == "xstest-completions":
        return load_xstest_completions(cfg.path, **kw)
    return load_safety_pairs(cfg.path, cfg.field_map, split=cfg.split, **kw)


def build_verification(cfg: VerificationBuild) -> dict:
    """Run a build and write ``cfg.out``; returns the metadata (counts, content_hash, ...)."""
    loaded = _load_source(cfg)
    rejected = list(loaded.rejected)
    report: dict = {}
    if loaded.items and isinstance(loaded.items[0], Problem):
        problems = loaded.items
        if cfg.candidates == "controlled":
            records = controlled_candidates(
                problems, ControlledConfig(wrong_per_problem=cfg.wrong_per_problem, seed=cfg.seed)
            )
        else:
            from .loading import load_model, load_tokenizer

            ptok = load_tokenizer(cfg.policy_tokenizer) if cfg.policy_tokenizer else None
            model, ptok = load_model(cfg.policy, ptok, seed=cfg.seed)
            scfg = SamplingConfig(
                n_samples=cfg.n_samples,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                num_loops=cfg.num_loops,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                on_unparsed=cfg.on_unparsed,
            )
            records, sreport = sample_candidates(model, ptok, problems, scfg)
            report["sampling"] = sreport.as_dict()
    else:
        records = list(loaded.items)
    if not records:
        counts = report.get("sampling", {})
        why = (
            f": {counts.get('generated', 0)} answers sampled, {counts.get('truncated', 0)} cut off by the "
            f"{counts.get('max_new_tokens')}-token budget, {counts.get('dropped_unparsed', 0)} unparsed and dropped "
            "(raise --max-new-tokens, or keep them with --on-unparsed keep)"
            if counts
            else ""
        )
        raise ValueError(f"build {cfg.out}: no records to write from source {cfg.source!r}{why}")
    if cfg.dedupe:
        before = len(records)
        records = deduplicate(records)
        report["deduplicated"] = before - len(records)
    if cfg.balance:
        records = balance_labels(records, seed=cfg.seed)
    kind = "verification"
    if cfg.render:
        from .loading import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        template = load_template(cfg.template) if cfg.template else DEFAULT_TEMPLATE
        records, bad = render_records(records, tok, template, cfg.max_length, skip_invalid=cfg.skip_invalid)
        rejected += bad
        kind = "rendered"
        report["tokenizer"] = getattr(tok, "name_or_path", cfg.tokenizer)
        report["template"] = dataclasses.asdict(template)
    counts = Counter()
    for r in records:
        counts[f"label={r['label']}"] += 1
        counts[f"parse_status={r['parse_status']}"] += 1
        counts[f"scenario={r['scenario']}"] += 1
    settings = dataclasses.asdict(cfg)
    settings.pop("out")
    settings.pop("overwrite")
    meta = {
        "builder": "data_builders.verification",
        "settings": settings,
        "counts": dict(sorted(counts.items())),
        **report,
    }
    return save_build(
        records, cfg.out, kind, meta, rejected=rejected, skip_invalid=cfg.skip_invalid, overwrite=cfg.overwrite
    )


def synthetic_verification_records(
    tokenizer,
    n_problems: int,
    seed: int = 0,
    levels: tuple[int, ...] = (1, 2),
    candidate_seed: int | None = None,
    template=DEFAULT_TEMPLATE,
) -> list[dict]:
    """In memory, what ``--source synthetic --render`` builds: ``n_problems`` synthetic problems
    (``seed``, ``levels``), each with its gold and one controlled wrong answer (seeded by
    ``candidate_seed``, default ``seed``), rendered with ``template`` -> 2 * n_problems records."""
    problems = generate_problems(n_problems, seed=seed, levels=tuple(levels))
    config = ControlledConfig(seed=seed if candidate_seed is None else candidate_seed)
    rendered, _ = render_records(controlled_candidates(problems, config), tokenizer, template)  # raises on a bad row
    return rendered


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_builders.verification",
        description="Build a verification dataset (task, candidate answer, label) and optionally render prompts.",
    )
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--path", help="local file/folder or hub dataset name (all sources but synthetic)")
    p.add_argument("--out", required=True, help="output build folder (written atomically)")
    p.add_argument("--n", type=int, help="synthetic: number of problems (default 200); others: rows read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=_ints, default=(1, 2, 3, 4), help="synthetic difficulty levels, e.g. 1,2,3,4")
    p.add_argument("--split", default="test", help="hub split (default test)")
    p.add_argument("--field-map", default="beavertails", help="safety-pairs field map: beavertails | pku-saferlhf")
    p.add_argument("--candidates", default="controlled", choices=("controlled", "sampled"))
    p.add_argument("--wrong-per-problem", type=int, default=1)
    p.add_argument("--policy", help="policy model for sampled candidates: folder, hub name or 'tiny'")
    p.add_argument("--policy-tokenizer", help="tokenizer for the policy (default: the policy's own; 'local')")
    p.add_argument("--num-loops", type=int, help="loops for a looped policy (Ouro)")
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens per sampled answer (default: enough for the source, e.g. GSM8K 512; an answer cut off is unparsed)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--on-unparsed",
        default="drop",
        choices=("keep", "drop"),
        help="sampled answers with no readable final answer (or cut off by --max-new-tokens): dropped and counted "
        "(default), or kept with parse_status=unparsed and label 0",
    )
    p.add_argument("--balance", action="store_true", help="down-sample the majority label to 1:1 (per scenario)")
    p.add_argument("--dedupe", action="store_true", help="drop repeated answers to the same task")
    p.add_argument("--render", action="store_true", help="add prompt, input_ids and token indices")
    p.add_argument("--tokenizer", default="local", help="'local' or a hub name/folder (with --render)")
    p.add_argument("--template", help="YAML/JSON file with PromptTemplate fields (with --render)")
    p.add_argument("--max-length", type=int, help="reject rendered prompts longer than this many tokens")
    p.add_argument("--skip-invalid", action="store_true", help="drop bad rows, count them, write rejected.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = VerificationBuild(**{k: v for k, v in vars(args).items()})
        meta = build_verification(cfg)
    except (ValueError, RecordError, FileExistsError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: meta[k] for k in ("kind", "n_rows", "n_rejected", "content_hash", "counts")}
    print(json.dumps({"out": cfg.out, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
