"""Build a verification dataset (task, candidate answer, label), and render its prompts with ``--render``.

    loopalign build-data --source synthetic --n 200 --seed 0 --render --out DIR
    loopalign build-data --dataset gsm8k:openai/gsm8k --render --tokenizer MODEL --out DIR   # eval-gap's spelling
    loopalign build-data --config builder.yaml --seed 1     # YAML, command-line options override it
    python -m data_builders.verification ...                # the same command

Sources: synthetic, gsm8k and math give problems, answered by --candidates controlled (gold + wrong answers) or
sampled (--policy); safety-prompts gives prompts (sampled only); gsm8k-solutions, xstest-completions, safety-pairs
and table (your own .jsonl / .csv through --columns; docs/data.md) are already (task, answer, label) records.
The build (loopalign.data.verification) is written atomically, with content_hash in metadata.json.

Options take - or _ (--num-loops, --num_loops), and the recipes' names work too: --output_dir, --dataset_limit,
--synthetic_levels, --dataset_split, --data_seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from loopalign.data.schema import SCENARIOS
from loopalign.data.verification import SOURCES, VerificationBuild, build_verification, source_of_spec
from loopalign.errors import ConfigError
from loopalign.scripts.args import make_parser, run_build_command

__all__ = ["BuildDataScriptArguments", "build_parser", "main"]

#: the name of the command in its usage line (``python -m data_builders.verification`` passes its own)
PROG = "loopalign build-data"


@dataclass
class BuildDataScriptArguments:
    """The options of a verification build; validated on creation (a bad value names its option), so a bad
    value stops the command before any source is read or model loaded."""

    out: str = field(
        metadata={"help": "Output build folder (written atomically).", "aliases": ["--output_dir", "--output-dir"]}
    )
    source: str | None = field(
        default=None, metadata={"help": "The data source (or --dataset SOURCE:PATH).", "choices": SOURCES}
    )
    path: str | None = field(
        default=None, metadata={"help": "Local file/folder or hub dataset name (all sources but synthetic)."}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "The source as eval-gap and sft-gap name it: SOURCE:PATH_OR_HUB (gsm8k:openai/gsm8k) or "
            "synthetic, instead of --source/--path."
        },
    )
    n: int | None = field(
        default=None,
        metadata={
            "help": "synthetic: number of problems (default 200); others: rows read.",
            "aliases": ["--dataset_limit", "--dataset-limit"],
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Draws the data (default 0).", "aliases": ["--data_seed", "--data-seed"]}
    )
    levels: str = field(
        default="1,2,3,4",
        metadata={
            "help": "Synthetic difficulty levels, e.g. 1,2,3,4.",
            "aliases": ["--synthetic_levels", "--synthetic-levels"],
        },
    )
    split: str = field(
        default="test",
        metadata={"help": "Hub split (default test).", "aliases": ["--dataset_split", "--dataset-split"]},
    )
    field_map: str = field(
        default="beavertails", metadata={"help": "safety-pairs field map: beavertails | pku-saferlhf."}
    )
    columns: str | None = field(
        default=None,
        metadata={
            "help": "table: FIELD=COLUMN pairs mapping the file's columns: task=,answer=,label= (+ gold= for math) "
            "or statement=,label=; optional cluster=, id=."
        },
    )
    scenario: str | None = field(
        default=None,
        metadata={
            "help": "table: the records' scenario (default math, or statement for a statement= map).",
            "choices": SCENARIOS,
        },
    )
    candidates: str = field(
        default="controlled",
        metadata={
            "help": "Answers of a problem source: controlled (gold + wrong answers) | sampled (by --policy).",
            "choices": ("controlled", "sampled"),
        },
    )
    wrong_per_problem: int = field(default=1, metadata={"help": "Controlled wrong answers per problem."})
    policy: str | None = field(
        default=None, metadata={"help": "Policy model for sampled candidates: folder, hub name or 'tiny'."}
    )
    policy_tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer for the policy (default: the policy's own; 'local')."}
    )
    num_loops: int | None = field(default=None, metadata={"help": "Loops for a looped policy (Ouro)."})
    n_samples: int = field(default=4, metadata={"help": "Sampled answers per problem."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "New tokens per sampled answer (default: enough for the source, e.g. GSM8K 512; an answer cut "
            "off is unparsed)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Problems per sampling batch."})
    on_unparsed: str = field(
        default="drop",
        metadata={
            "help": "Sampled answers with no readable final answer (or cut off by --max-new-tokens): dropped and "
            "counted (drop), or kept with parse_status=unparsed and label 0 (keep).",
            "choices": ("keep", "drop"),
        },
    )
    balance: bool = field(default=False, metadata={"help": "Down-sample the majority label to 1:1 (per scenario)."})
    dedupe: bool = field(default=False, metadata={"help": "Drop repeated answers to the same task."})
    render: bool = field(default=False, metadata={"help": "Add prompt, input_ids and token indices."})
    tokenizer: str = field(default="local", metadata={"help": "'local' or a hub name/folder (with --render)."})
    template: str | None = field(
        default=None, metadata={"help": "YAML/JSON file with PromptTemplate fields (with --render)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Reject rendered prompts longer than this many tokens."}
    )
    skip_invalid: bool = field(default=False, metadata={"help": "Drop bad rows, count them, write rejected.jsonl."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})

    def __post_init__(self):
        self.build_config()  # every value checked here, before anything is read or loaded

    def build_config(self) -> VerificationBuild:
        """The :class:`VerificationBuild` these options describe (``--dataset`` read as ``--source``/``--path``)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dataset"}
        if self.dataset is not None:
            if self.source is not None or self.path is not None:
                raise ConfigError("give the data as --dataset SOURCE:PATH or as --source/--path, not both")
            settings["source"], settings["path"] = source_of_spec(self.dataset)
        elif self.source is None:
            raise ConfigError("the data source is required: --source SOURCE [--path PATH], or --dataset SOURCE:PATH")
        if isinstance(self.levels, (list, tuple)):  # a YAML list
            settings["levels"] = tuple(self.levels)
        return VerificationBuild(**settings)


def build_parser(prog: str = PROG):
    """The command's ``TrlParser`` (BuildDataScriptArguments; YAML with ``--config``); ``prog``: the name it runs under."""
    return make_parser((BuildDataScriptArguments,), __doc__, prog=prog)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``loopalign build-data`` / ``python -m data_builders.verification``: parse ``argv`` (default
    ``sys.argv[1:]``), build, print the build's summary (JSON); 2 when the build fails."""
    return run_build_command(build_parser(prog), argv, lambda args: build_verification(args.build_config()), _summary)


def _summary(meta: dict) -> dict:
    out = {k: meta[k] for k in ("kind", "n_rows", "n_rejected", "n_dropped", "content_hash", "counts")}
    out["accounting"] = {k: meta["accounting"][k] for k in ("entries", "records")}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
