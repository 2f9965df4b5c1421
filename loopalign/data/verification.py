"""Build a verification dataset: source -> candidates -> (dedupe, balance) -> (render) -> build folder.

    python -m data_builders.verification --source synthetic --n 200 --seed 0 --out DIR
    python -m data_builders.verification --source gsm8k-solutions \\
        --path /work/shared/data/gsm8k/example_model_solutions.jsonl --render --tokenizer local --out DIR
    python -m data_builders.verification --source xstest-completions \\
        --path /work/shared/data/xstest/model_completions --out DIR
    python -m data_builders.verification --source table --path my_rows.csv \\
        --columns task=question,answer=response,label=ok,gold=reference --render --tokenizer MODEL --out DIR

Sources: ``synthetic``, ``gsm8k`` and ``math`` give problems, answered by ``--candidates controlled``
(gold + wrong answers; the default) or ``sampled`` (``--policy``); ``safety-prompts`` gives prompts
(sampled only); ``gsm8k-solutions``, ``xstest-completions`` and ``safety-pairs`` are already
(task, answer, label) records, and so is ``table``: a user's own ``.jsonl`` / ``.csv`` file read through
a column map (``--columns``, :mod:`loopalign.data.sources.table`; ``--scenario`` math, safety or statement). ``--n``: the number of synthetic problems, else the rows read.
The output folder (see :mod:`loopalign.data.io`) has ``content_hash`` in ``metadata.json``. The command (its
options, ``--config`` YAML) is :mod:`loopalign.scripts.build_data` (``loopalign build-data``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from loopalign.errors import ConfigError
from loopalign.loading import load_model, load_tokenizer

from .candidates import (
    ControlledConfig,
    SamplingConfig,
    balance_split,
    controlled_candidates,
    deduplicate_split,
    sample_candidates,
)
from .io import save_build, write_failed_report
from .prompts import DEFAULT_TEMPLATE, load_template, render_records
from .schema import Dropped, Rejected, meta_dict, validate_records
from .sources import (
    generate_problems,
    load_gsm8k,
    load_gsm8k_solutions,
    load_math,
    load_safety_pairs,
    load_safety_prompts,
    load_xstest_completions,
)
from .sources.base import SourceResult
from .sources.synthetic import MAX_LEVEL
from .sources.table import load_table, parse_column_map

__all__ = [
    "SOURCES",
    "VerificationBuild",
    "build_verification",
    "source_of_spec",
    "synthetic_verification_records",
    "table_verification_records",
]

PROBLEM_SOURCES = ("synthetic", "gsm8k", "math", "safety-prompts")
RECORD_SOURCES = ("gsm8k-solutions", "xstest-completions", "safety-pairs", "table")
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
    columns: str | None = None
    scenario: str | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"--source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "table":
            if not self.columns:
                raise ConfigError(
                    "--source table needs --columns, e.g. task=question,answer=response,label=ok,gold=reference "
                    "or statement=claim,label=truth,cluster=subject"
                )
            try:
                cmap = parse_column_map(self.columns)
                cmap.check(self.scenario or ("statement" if cmap.statement else "math"))
            except ValueError as e:
                raise ConfigError(f"--{e}" if str(e).startswith("columns") else f"--scenario: {e}") from None
        elif self.columns or self.scenario:
            raise ConfigError("--columns and --scenario apply to --source table (a user's .jsonl / .csv file)")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"--source {self.source} needs --path (a local file/folder or a hub dataset name)")
        if self.candidates not in ("controlled", "sampled"):
            raise ConfigError(f"--candidates must be 'controlled' or 'sampled', got {self.candidates!r}")
        if self.source in PROBLEM_SOURCES and self.candidates == "sampled" and not self.policy:
            raise ConfigError("--candidates sampled needs --policy (a model folder, hub name or 'tiny')")
        if self.source == "safety-prompts" and self.candidates != "sampled":
            raise ConfigError("--source safety-prompts has no gold answers: use --candidates sampled with --policy")
        if self.source in RECORD_SOURCES and self.candidates == "sampled":
            raise ConfigError(
                f"--source {self.source} already holds model answers; --candidates sampled does not apply"
            )
        for option, value, low in (
            ("--n", self.n, 1),
            ("--seed", self.seed, None),
            ("--wrong-per-problem", self.wrong_per_problem, 0),
            ("--num-loops", self.num_loops, 1),
            ("--n-samples", self.n_samples, 1),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--batch-size", self.batch_size, 1),
            ("--max-length", self.max_length, 1),
        ):
            _check_int(option, value, low)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ConfigError(f"--temperature must be a number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.on_unparsed not in ("keep", "drop"):
            raise ConfigError(f"--on-unparsed must be 'keep' or 'drop', got {self.on_unparsed!r}")
        self.levels = _levels(self.levels)


_DEFAULTS_HINT = {
    "--n": "leave it out for the default: 200 synthetic problems, or every row of --path",
    "--num-loops": "leave it out for the policy's own loop count",
    "--max-new-tokens": "leave it out for the source's budget",
    "--max-length": "leave it out for no limit",
}


def _check_int(option: str, value, low: int | None) -> None:
    """``value`` is None (the default) or an int >= ``low``; else a ValueError naming ``option``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be an integer, got {value!r}")
    if low is not None and value < low:
        hint = f" ({_DEFAULTS_HINT[option]})" if option in _DEFAULTS_HINT else ""
        raise ValueError(f"{option} must be >= {low}{hint}, got {value}")


def _levels(value) -> tuple[int, ...]:
    """``--levels`` as a tuple of ints in 1..MAX_LEVEL (from a tuple/list or a "1,2,3" string)."""
    parts = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
    try:
        if any(isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()) for x in parts):
            raise ValueError
        levels = tuple(int(x) for x in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--levels must be comma-separated integers in 1..{MAX_LEVEL}, got {value!r}") from None
    if not levels or any(not 1 <= x <= MAX_LEVEL for x in levels):
        raise ValueError(f"--levels must be one or more of 1..{MAX_LEVEL} (synthetic difficulty), got {value!r}")
    return levels


def _load_source(cfg: VerificationBuild) -> SourceResult:
    kw = {"limit": cfg.n, "skip_invalid": cfg.skip_invalid}
    if cfg.source == "synthetic":
        problems = generate_problems(cfg.n if cfg.n is not None else 200, cfg.seed, cfg.levels)
        return SourceResult(items=problems, n_read=len(problems), n_converted=len(problems))
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
    if cfg.source == "table":
        return load_table(cfg.path, cfg.columns, cfg.scenario, **kw)
    return load_safety_pairs(cfg.path, cfg.field_map, split=cfg.split, **kw)


def _by_reason(items, unit: str) -> dict[str, int]:
    return dict(sorted(Counter(x.reason for x in items if x.unit == unit).items()))


def _accounting(entries: dict, records: dict, rejected: list[Rejected], dropped: list[Dropped]) -> dict:
    """Per unit (source entries, records): read/made = kept + rejected + dropped, and the reasons."""
    units = {"entries": "entry", "records": "record"}
    out = {"entries": dict(entries), "records": dict(records)}
    for name, unit in units.items():
        out[name]["rejected"] = sum(r.unit == unit for r in rejected)
        out[name]["dropped"] = sum(d.unit == unit for d in dropped)
    out["rejected_by_reason"] = {name: _by_reason(rejected, unit) for name, unit in units.items()}
    out["dropped_by_reason"] = {name: _by_reason(dropped, unit) for name, unit in units.items()}
    return out


def _reason_list(reasons: dict[str, int], top: int = 4) -> str:
    if not reasons:
        return ""
    parts = [f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:top]]
    return " (" + "; ".join(parts) + ("; ..." if len(reasons) > top else "") + ")"


def _empty_message(cfg: VerificationBuild, acct: dict, sampling: dict, failed) -> str:
    where = f"--source {cfg.source}" + (f" --path {cfg.path}" if cfg.path else "") + (f" --n {cfg.n}" if cfg.n else "")
    e, r = acct["entries"], acct["records"]
    text = (
        f"build {cfg.out}: no records to write from {where}: source entries: {e['read']} read"
        + (f" ({cfg.path} holds none)" if not e["read"] and cfg.path else "")
        + f", {e['rejected']} rejected{_reason_list(acct['rejected_by_reason']['entries'])}"
        + f", {e['dropped']} dropped{_reason_list(acct['dropped_by_reason']['entries'])}"
    )
    if e["read"]:
        text += (
            f"; records: {r['made']} made, {r['rejected']} rejected{_reason_list(acct['rejected_by_reason']['records'])}"
            f", {r['dropped']} dropped{_reason_list(acct['dropped_by_reason']['records'])}"
        )
    if sampling:
        text += (
            f"; sampling: {sampling.get('generated', 0)} answers sampled, {sampling.get('truncated', 0)} cut off by "
            f"the {sampling.get('max_new_tokens')}-token budget, {sampling.get('dropped_unparsed', 0)} unparsed and "
            "dropped (raise --max-new-tokens, or keep them with --on-unparsed keep)"
        )
    if failed:
        text += f". The rejected and dropped rows are in {failed}"
    return text


def build_verification(cfg: VerificationBuild) -> dict:
    """Run a build and write ``cfg.out``; returns the metadata (counts, content_hash, accounting, ...).

    ``metadata["accounting"]`` reconciles every unit: source ``entries`` (read = kept + rejected +
    dropped) and ``records`` (made = kept + rejected + dropped, kept = ``n_rows``), with the reasons.
    Rejected rows go to ``rejected.jsonl`` (``--skip-invalid``), dropped ones (``--balance``,
    ``--dedupe``, problems without a possible wrong answer, unparsed samples) to ``dropped.jsonl``.
    A build that ends with no records raises a ValueError saying why, leaving ``cfg.out`` untouched
    and the rejected / dropped rows in ``<out>.failed/``.
    """
    loaded = _load_source(cfg)
    rejected: list[Rejected] = list(loaded.rejected)
    dropped: list[Dropped] = []
    report: dict = {}
    n_read = loaded.n_read if loaded.n_read is not None else len(loaded.items)
    n_converted = loaded.n_converted if loaded.n_converted is not None else len(loaded.items)
    if cfg.source in PROBLEM_SOURCES:
        problems = loaded.items
        if cfg.candidates == "controlled":
            ccfg = ControlledConfig(wrong_per_problem=cfg.wrong_per_problem, seed=cfg.seed, drop_without_wrong=True)
            records = controlled_candidates(problems, ccfg, dropped)
            wrong = Counter(meta_dict(r)["problem_id"] for r in records if r["label"] == 0)
            kept_ids = {meta_dict(r)["problem_id"] for r in records}
            report["controlled"] = {
                "wrong_per_problem": cfg.wrong_per_problem,
                "problems_short_of_wrong_answers": sum(wrong[i] < cfg.wrong_per_problem for i in kept_ids),
            }
        elif problems:
            ptok = load_tokenizer(cfg.policy_tokenizer) if cfg.policy_tokenizer else None
            model, ptok = load_model(cfg.policy, tokenizer=ptok, seed=cfg.seed)
            scfg = SamplingConfig(
                n_samples=cfg.n_samples,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
                num_loops=cfg.num_loops,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                on_unparsed=cfg.on_unparsed,
            )
            records, sreport = sample_candidates(model, ptok, problems, scfg, dropped)
            report["sampling"] = sreport.as_dict()
        else:
            records = []
    else:
        records = list(loaded.items)
    entries = {"read": n_read, "kept": n_converted - sum(d.unit == "entry" for d in dropped)}
    made = len(records) + sum(x.unit == "record" for x in rejected + dropped)  # records lost so far included

    kind = "rendered" if cfg.render else "verification"
    checked = validate_records(records, kind="verification", skip_invalid=cfg.skip_invalid)
    rejected += checked.rejected  # before counting, balancing or rendering: a duplicate id is not counted
    records = checked.rows
    if cfg.dedupe:
        records, gone = deduplicate_split(records)
        dropped += gone
        report["deduplicated"] = len(gone)
    if cfg.balance:
        records, gone = balance_split(records, seed=cfg.seed)
        dropped += gone
        report["balanced_away"] = len(gone)
    if cfg.render and records:
        tok = load_tokenizer(cfg.tokenizer)
        template = load_template(cfg.template) if cfg.template else DEFAULT_TEMPLATE
        records, bad = render_records(records, tok, template, cfg.max_length, skip_invalid=cfg.skip_invalid)
        rejected += bad
        report["tokenizer"] = getattr(tok, "name_or_path", cfg.tokenizer)
        report["template"] = dataclasses.asdict(template)
    checked = validate_records(records, kind=kind, skip_invalid=cfg.skip_invalid)
    rejected += checked.rejected
    records = checked.rows
    acct = _accounting(entries, {"made": made, "kept": len(records)}, rejected, dropped)
    settings = dataclasses.asdict(cfg)
    settings.pop("out")
    settings.pop("overwrite")
    if not records:
        failed = write_failed_report(cfg.out, rejected, dropped, {"settings": settings, "accounting": acct, **report})
        raise ValueError(_empty_message(cfg, acct, report.get("sampling", {}), failed))
    counts = Counter()
    for r in records:
        counts[f"label={r['label']}"] += 1
        counts[f"parse_status={r['parse_status']}"] += 1
        counts[f"scenario={r['scenario']}"] += 1
    meta = {
        "builder": "data_builders.verification",
        "settings": settings,
        "counts": dict(sorted(counts.items())),
        "accounting": acct,
        **report,
    }
    return save_build(
        records,
        cfg.out,
        kind,
        meta,
        rejected=rejected,
        skip_invalid=cfg.skip_invalid,
        overwrite=cfg.overwrite,
        dropped=dropped,
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


def table_verification_records(
    tokenizer,
    path: str,
    columns,
    scenario: str | None = None,
    template=DEFAULT_TEMPLATE,
    max_length: int | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[dict], dict]:
    """In memory, what ``--source table --render`` builds from a user's ``.jsonl`` / ``.csv`` file and
    column map (:func:`loopalign.data.sources.table.load_table`), rendered with ``tokenizer`` (its chat
    template) -> (rendered records, report). A bad row raises naming the row and the column; with
    ``skip_invalid`` it is left out and counted: the report holds ``read`` (entries of the file), ``kept``,
    ``rejected`` and ``rejected_by_reason``, ``scenario`` and ``columns``."""
    cmap = parse_column_map(columns)
    scenario = scenario or ("statement" if cmap.statement else "math")
    loaded = load_table(path, cmap, scenario, limit=limit, skip_invalid=skip_invalid)
    rejected = list(loaded.rejected)
    checked = validate_records(loaded.items, kind="verification", skip_invalid=skip_invalid)  # unique ids
    rejected += checked.rejected
    rendered, bad = render_records(checked.rows, tokenizer, template, max_length, skip_invalid=skip_invalid)
    rejected += bad
    report = {
        "path": str(path),
        "scenario": scenario,
        "columns": cmap.as_dict(),
        "read": loaded.n_read,
        "kept": len(rendered),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r.reason for r in rejected).items())),
    }
    if not rendered:
        raise ValueError(
            f"{path}: no usable rows ({loaded.n_read} read, {len(rejected)} rejected"
            + _reason_list(report["rejected_by_reason"])
            + ")"
        )
    return rendered, report


def source_of_spec(spec: str) -> tuple[str, str | None]:
    """A ``--dataset`` spec that names a data source -> (source, path): ``SOURCE:PATH_OR_HUB`` (``gsm8k:openai/gsm8k``)
    or ``synthetic``; anything else is a ConfigError naming the spec."""
    source, sep, path = spec.partition(":")
    if spec == "synthetic":
        return "synthetic", None
    if sep and source in SOURCES and path:
        return source, path
    raise ConfigError(
        f"dataset {spec!r} names no data source to build from: SOURCE:PATH_OR_HUB with SOURCE one of {list(SOURCES)}"
    )
