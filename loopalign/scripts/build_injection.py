"""Extract concept vectors per (loop, layer) and build concept-injection trial records (docs/introspection.md).

    loopalign build-injection --model tiny --loops 4 --layers 1 --out DIR
    loopalign build-injection --model ByteDance/Ouro-1.4B --layers 15 --out data/injection_ouro_1.4b
    loopalign build-injection --config injection.yaml --seed 1   # YAML, command-line options override it
    python -m data_builders.injection ...                        # the same command

DIR holds concept_vectors.safetensors and the trials/ build beside it, written whole and swapped in
(loopalign.injection.trials). Loops and layers are 0-based indices ('0-3', '0,2'; 'all' or unset: every one).
Options take - or _ (--extraction-loops, --extraction_loops), and the recipes' names work too:
--model_name_or_path, --output_dir.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from loopalign.injection.trials import build_injection, check_injection_options
from loopalign.loading import load_model, load_tokenizer
from loopalign.loops import parse_int_set, parse_loop_indices
from loopalign.scripts.args import make_parser, parse_strengths, run_build_command

__all__ = ["BuildInjectionScriptArguments", "build_parser", "main"]

#: the name of the command in its usage line and in the rebuild command a build records
#: (``python -m data_builders.injection`` passes its own)
PROG = "loopalign build-injection"


def _as_text(value):
    """A YAML list (``[0, 1]``) as the command line spells it (``0,1``); anything else as it is."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


@dataclass
class BuildInjectionScriptArguments:
    """The options of an injection build; validated on creation (a bad value names its option), before the model
    loads. Checks that need the model (``--layers`` against its depth) follow right after it loads."""

    model: str = field(
        metadata={
            "help": "A model folder, a hub name, or 'tiny' (random tiny Ouro).",
            "aliases": ["--model_name_or_path", "--model-name-or-path"],
        }
    )
    out: str = field(
        metadata={
            "help": "Output folder: concept_vectors.safetensors and trials/ (written whole, then swapped in).",
            "aliases": ["--output_dir", "--output-dir"],
        }
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer ('local', folder or hub name; default: the model's)."}
    )
    loops: int | None = field(
        default=None, metadata={"help": "num_loops the model runs (default: config.total_ut_steps)."}
    )
    layers: str | None = field(default=None, metadata={"help": "0-based layers, e.g. 0,1 (default all)."})
    extraction_loops: str | None = field(
        default=None, metadata={"help": "0-based loops the concept vectors are extracted at (default all)."}
    )
    injection_loops: str | None = field(
        default=None, metadata={"help": "0-based loops the vectors are injected at (default all)."}
    )
    strengths: str = field(default="1,2,4,8", metadata={"help": "Comma-separated injection strengths (> 0)."})
    n_controls: int = field(default=50, metadata={"help": "No-injection control trials."})
    n_concepts: int | None = field(default=None, metadata={"help": "Use only the first N concept words."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per extraction batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the random tiny model."})
    device: str = field(default="cpu", metadata={"help": "Device the model runs on."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing injection build."})

    def __post_init__(self):
        self.grid()  # every value checked here, before the model loads

    def grid(self) -> dict:
        """The trial grid these options give, as :func:`build_injection` takes it: ``layers``, ``extraction_loops``,
        ``injection_loops`` (tuples, or None for every one) and ``strengths``; a bad value names its option."""
        strengths = parse_strengths(_as_text(self.strengths), "--strengths")
        check_injection_options(self.loops, self.n_concepts, self.n_controls, self.batch_size, strengths)
        layers = parse_int_set(
            _as_text(self.layers), "--layers", allow_all=True, what="0-based layer indices", example="'0,1' or '15'"
        )
        loops = {
            name: parse_loop_indices(_as_text(getattr(self, name)), "--" + name.replace("_", "-"), self.loops)
            for name in ("extraction_loops", "injection_loops")
        }
        return {"layers": layers, **loops, "strengths": strengths}

    def command(self, prog: str) -> str:
        """The command (``prog`` and these options) that builds what these options build, less ``--out`` (added for
        the folder at hand): recorded in the build, named when its vectors go missing."""
        grid = self.grid()
        parts = [prog, "--model", self.model]
        for option, value in (
            ("--tokenizer", self.tokenizer),
            ("--loops", self.loops),
            ("--layers", grid["layers"]),
            ("--extraction-loops", grid["extraction_loops"]),
            ("--injection-loops", grid["injection_loops"]),
            ("--strengths", ",".join(f"{x:g}" for x in grid["strengths"])),
            ("--n-controls", self.n_controls),
            ("--n-concepts", self.n_concepts),
            ("--batch-size", self.batch_size),
            ("--seed", self.seed),
            ("--device", self.device),
        ):
            if value is not None:
                parts += [option, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
        return " ".join([parts[0]] + [shlex.quote(x) for x in parts[1:]])


def build_parser(prog: str = PROG):
    """The command's ``TrlParser`` (BuildInjectionScriptArguments; YAML with ``--config``); ``prog``: the name it
    runs under."""
    return make_parser((BuildInjectionScriptArguments,), __doc__, prog=prog)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``loopalign build-injection`` / ``python -m data_builders.injection``: parse ``argv`` (default
    ``sys.argv[1:]``), load the model, build, print the build's summary (JSON); 2 when the build fails. ``prog``:
    the name it runs under, recorded in the build's rebuild command."""
    return run_build_command(
        build_parser(prog),
        argv,
        lambda args: _build(args, prog),
        lambda meta: {k: meta[k] for k in ("n_rows", "content_hash", "vectors_hash")},
        indent=None,
    )


def _build(args: BuildInjectionScriptArguments, prog: str) -> dict:
    """Load the model the options name and build its injection data (:func:`build_injection`) -> the build's meta."""
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    model, tok = load_model(args.model, device=args.device, seed=args.seed, tokenizer=tok)
    return build_injection(
        model,
        tok,
        args.out,
        num_loops=args.loops,
        n_controls=args.n_controls,
        n_concepts=args.n_concepts,
        batch_size=args.batch_size,
        model_name=args.model,
        overwrite=args.overwrite,
        command=args.command(prog),
        **args.grid(),
    )


if __name__ == "__main__":
    raise SystemExit(main())
