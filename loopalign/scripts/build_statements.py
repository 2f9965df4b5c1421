"""Build true/false statement records (GeoNames facts and generated numbers), split by entity, with a card of
sources and licences (docs/data.md).

    loopalign build-statements --families city_country,capital,numeric,negated_city --per_family 300 \\
        --seed 0 --render --tokenizer MODEL_OR_FOLDER --out DIR
    loopalign build-statements --config statements.yaml --seed 1   # YAML, command-line options override it
    python -m data_builders.statements ...                         # the same command

DIR holds every record, DIR/train and DIR/eval (held-out entities) are build folders of each split, DIR/card.md
names the sources, versions and licences (loopalign.data.statements). Options take - or _ (--per-family,
--per_family), and the recipes' names work too: --output_dir, --data_seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from loopalign.data.sources.statements import FAMILIES
from loopalign.data.statements import StatementBuild, build_statements
from loopalign.scripts.args import make_parser, run_build_command

__all__ = ["BuildStatementsScriptArguments", "build_parser", "main"]

#: the name of the command in its usage line (``python -m data_builders.statements`` passes its own)
PROG = "loopalign build-statements"


@dataclass
class BuildStatementsScriptArguments:
    """The options of a statement build; validated on creation (a bad value names its option), before anything
    is built."""

    out: str = field(
        metadata={
            "help": "Output build folder (written atomically; train/ and eval/ inside).",
            "aliases": ["--output_dir", "--output-dir"],
        }
    )
    families: str = field(
        default=",".join(FAMILIES),
        metadata={"help": f"Comma-separated families (default all): {', '.join(FAMILIES)}."},
    )
    per_family: int = field(default=300, metadata={"help": "Statements per family, even (default 300)."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Distractors, numbers and the entity split (default 0).",
            "aliases": ["--data_seed", "--data-seed"],
        },
    )
    eval_fraction: float = field(default=0.2, metadata={"help": "Chance an entity is held out (default 0.2)."})
    render: bool = field(default=False, metadata={"help": "Add prompt, input_ids and token positions."})
    tokenizer: str = field(default="local", metadata={"help": "'local' or a folder / hub name (with --render)."})
    template: str | None = field(
        default=None,
        metadata={"help": "YAML/JSON file with PromptTemplate fields, e.g. statement (with --render)."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Fail on a rendered prompt longer than this many tokens."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})

    def __post_init__(self):
        self.build_config()  # every value checked here, before anything is built

    def build_config(self) -> StatementBuild:
        """The :class:`StatementBuild` these options describe."""
        return StatementBuild(**{f.name: getattr(self, f.name) for f in fields(self)})


def build_parser(prog: str = PROG):
    """The command's ``TrlParser`` (BuildStatementsScriptArguments; YAML with ``--config``); ``prog``: the name it runs
    under."""
    return make_parser((BuildStatementsScriptArguments,), __doc__, prog=prog)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``loopalign build-statements`` / ``python -m data_builders.statements``: parse ``argv`` (default
    ``sys.argv[1:]``), build, print the build's summary (JSON); 2 when the build fails."""
    return run_build_command(
        build_parser(prog),
        argv,
        lambda args: build_statements(args.build_config()),
        lambda meta: {k: meta[k] for k in ("kind", "n_rows", "content_hash", "counts")},
    )


if __name__ == "__main__":
    raise SystemExit(main())
