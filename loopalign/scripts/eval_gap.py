"""SV / RR / gap (and TP) per loop for a looped model, or a plain causal LM (one loop); writes gap.json,
gap.md, plots and probes.

    python recipes/eval_gap.py                          # the model organism (built on first use), its held-out tasks
    python recipes/eval_gap.py --model_name_or_path tiny --eval_loops 1-8 --output_dir outputs/eval_tiny   # noise
    loopalign eval-gap --model_name_or_path ByteDance/Ouro-1.4B --dataset builds/math --eval_loops 1-8
    loopalign eval-gap --model_name_or_path RUN/final --dataset DIR --output_dir outputs/after --compare outputs/before
    loopalign eval-gap --config my_eval.yaml --eval_n_boot 200          # YAML + command-line overrides

The evaluation options (GapEvalArguments) have the names and defaults of sft_gap's before/after
evaluation: loops 1 to the model's depth + 2 (a non-looped model: 1), k-fold RR probes, TP on
(``--no_eval_tp`` skips generation). ``--model_name_or_path organism`` (the default) is loopalign's
model organism, built into the cache first when missing; ``tiny`` a random tiny Ouro. Without
``--dataset`` the organism is measured on its own held-out tasks (digit sums of its evaluation
triples, gold + one wrong digit each, clustered by triple; ``--dataset_limit`` of them, ``--data_seed``),
other models on held-out synthetic arithmetic from data_builders. ``--dataset`` takes every spec sft-gap takes,
read by the same resolver (:mod:`loopalign.data.load`; docs/data.md, "The --dataset vocabulary").
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, fields

from loopalign.data.load import (
    DATASET_HELP,
    DatasetRequest,
    dataset_kind,
    is_statement_spec,
    load_dataset,
    load_dataset_splits,
)
from loopalign.errors import ConfigError
from loopalign.eval import (
    CompareConfig,
    GapResult,
    compare,
    evaluate_gap,
    load_frozen_probes,
)
from loopalign.eval.report import before_after_figure, save_figure
from loopalign.io import atomic_write_text
from loopalign.loading import is_gap_run_folder, is_local_model, load_model, local_model_names
from loopalign.log import command_console
from loopalign.loops import parse_loop_counts
from loopalign.models.contract import is_looped
from loopalign.models.retrofit import RetrofitConfig, retrofit_recurrence
from loopalign.organism import (
    ORGANISM_MODELS,
    is_organism_model,
    organism_config_for,
    organism_tasks,
)
from loopalign.scripts.args import (
    EVAL_ARGS_FILE,
    GapEvalArguments,
    cpu_device,
    default_eval_loops,
    make_parser,
    parse_or_exit,
    parse_synthetic_levels,
    reporting_targets,
)
from loopalign.speed import set_cpu_threads


@dataclass
class EvalGapScriptArguments(GapEvalArguments):
    """The model, the records and the outputs (and, inherited from GapEvalArguments, what is measured)."""

    model_name_or_path: str = field(
        default="organism",
        metadata={"help": "'organism' (default), 'tiny', a gap-SFT final/ folder, a folder or hub name."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": DATASET_HELP + " 'organism' and 'statements' are their held-out side (what sft-gap holds out). "
            "Default: the organism's held-out tasks for the organism, synthetic arithmetic for other local models; "
            "required for others."
        },
    )
    dataset_limit: int = field(
        default=300,
        metadata={
            "help": "Problems (2 records each) of organism / synthetic; statements per family; rows of a source."
        },
    )
    synthetic_levels: str = field(default="1", metadata={"help": "Levels of the synthetic problems (e.g. '1,2')."})
    data_seed: int = field(
        default=20_000, metadata={"help": "Seed of the organism / synthetic problems (held out) and of a source build."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Output folder (default outputs/eval_gap_<model>: one per model, e.g. ByteDance--Ouro-1.4B)."
        },
    )
    verdict_yes: str | None = field(
        default=None, metadata={"help": "One-token verbal verdict for label 1 (sft-gap's option; default Yes)."}
    )
    verdict_no: str | None = field(
        default=None, metadata={"help": "One-token verbal verdict for label 0 (sft-gap's option; default No)."}
    )
    verdict_tokens: str | None = field(
        default=None, metadata={"help": "Both verdicts in one option: 'yes,no' strings or token ids."}
    )
    per_device_eval_batch_size: int = field(
        default=16, metadata={"help": "Records per forward / prompts per generate."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda | cpu | ... (default: cuda when available)."})
    use_cpu: bool = field(
        default=False, metadata={"help": "Run on the CPU (sft-gap's option, TRL's name): the same as --device cpu."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights' dtype: auto | bfloat16 | float32 | ..."})
    seed: int = field(default=0, metadata={"help": "Seed of the probe splits, the bootstrap and a tiny model."})
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "wandb to log to W&B (offline without an API key); none (the default): nothing. A list, as in "
            "sft-gap (TRL's option)."
        },
    )
    wandb_project: str = field(default="loopalign", metadata={"help": "W&B project with report_to=wandb."})
    compare: str | None = field(
        default=None,
        metadata={"help": "A previous output_dir (the 'before', or its gap.json): writes compare.md/json."},
    )
    verdict_depth: int | None = field(
        default=None, metadata={"help": "Loop of the --compare verdict (default: the trained depth)."}
    )
    group_by: str | None = field(
        default=None,
        metadata={
            "help": "Record field whose values cluster the records (probe splits, bootstrap); default: the "
            "organism's (item, a, b) triple for its own tasks, else 'task'."
        },
    )
    retrofit: str | None = field(
        default=None,
        metadata={
            "help": "Loop a plain Llama-family LM before measuring it: 'A-B' makes its layers [A, B) the recurrent "
            "block (layers before it the prelude, after it the coda; retrofitted recurrence, "
            "loopalign.models.retrofit) with the 'sum' adapter, so one loop is the source model and more loops "
            "rerun the block untrained (e.g. --retrofit 12-18 --eval_loops 1-6)."
        },
    )
    probe_train_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Labelled records the evaluation never scores, for the train-split probe (a stronger yardstick "
            "beside RR, rr_train_split): a build, saved dataset or .jsonl rendered for this model, or 'train' with "
            "--dataset statements (the training entities sft-gap trains on). Unset: no train-split probe."
        },
    )

    def __post_init__(self):
        self.run_inputs = run_inputs_of(self.model_name_or_path) if self.dataset is None else None
        if self.run_inputs is not None:  # an sft-gap run's final/: its held-out records and evaluation settings
            self.adopt_run_settings(self.run_inputs)
        super().__post_init__()
        if self.dataset is None and not is_local_model(self.model_name_or_path):
            raise ConfigError(
                f"dataset is required unless model_name_or_path is one of {local_model_names()} or an sft-gap run's "
                "final/ folder (whose run kept its held-out records)"
            )
        if self.dataset == "organism" and not is_organism_model(self.model_name_or_path):
            raise ConfigError(
                "dataset='organism' (its held-out digit tasks) needs a gap organism as model_name_or_path "
                f"({' or '.join(ORGANISM_MODELS)}, or an organism's folder), got {self.model_name_or_path!r}"
            )
        if self.dataset_limit < 1:
            raise ConfigError(f"dataset_limit must be >= 1, got {self.dataset_limit}")
        parse_synthetic_levels(self.synthetic_levels)
        if self.dataset is not None:  # a dataset that names nothing fails before the model loads
            dataset_kind(self.dataset, self.dataset_columns)
        if self.verdict_tokens is not None and len(self.verdict_tokens.split(",")) != 2:
            raise ConfigError(f"verdict_tokens must be two tokens 'yes,no', got {self.verdict_tokens!r}")
        if self.verdict_tokens is not None and (self.verdict_yes is not None or self.verdict_no is not None):
            raise ConfigError("give the verdicts as verdict_yes / verdict_no or as verdict_tokens, not both")
        self.report_to = reporting_targets(self.report_to)
        self.device = cpu_device(self.device, self.use_cpu)
        if self.probe_train_dataset == "train" and not is_statement_spec(self.dataset or ""):
            raise ConfigError(
                "probe_train_dataset='train' names the training entities of --dataset statements; with another "
                f"dataset ({self.dataset!r}) give the training records' path"
            )
        if self.probe_train_dataset not in (None, "train") and not os.path.exists(self.probe_train_dataset):
            raise ConfigError(f"probe_train_dataset {self.probe_train_dataset!r} does not exist")
        if self.retrofit is not None:
            self.retrofit_block()  # a malformed range fails before the model loads
        if self.compare and not os.path.exists(
            os.path.join(self.compare, "gap.json") if os.path.isdir(self.compare) else self.compare
        ):
            raise ConfigError(
                f"--compare {self.compare}: no gap.json there (a before/ folder of eval_gap or sft_gap, or its gap.json)"
            )

    def retrofit_block(self) -> tuple[int, int]:
        """``--retrofit 'A-B'`` -> (A, B), 0 <= A < B."""
        try:
            start, end = (int(x) for x in self.retrofit.split("-"))
        except ValueError:
            start = end = -1
        if not 0 <= start < end:
            raise ConfigError(
                f"retrofit must be a layer range 'A-B' with 0 <= A < B (e.g. '12-18'), got {self.retrofit!r}"
            )
        return start, end

    def adopt_run_settings(self, run: dict) -> None:
        """The run's evaluation settings (``eval_args.json``) for every option left at its default; the run's
        held-out records as the dataset and its train-split records for the train-split probe."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in run["args"].items():
            if name in ("dataset", "probe_train_dataset"):
                value = None if value is None else os.path.join(run["folder"], value)
            if name in defaults and getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def verdict(self) -> tuple[str | int, str | int]:
        if self.verdict_tokens is None:
            yes, no = self.verdict_yes or "Yes", self.verdict_no or "No"
        else:
            yes, no = (s.strip() for s in self.verdict_tokens.split(","))
        return tuple(int(s) if s.lstrip("-").isdigit() else s for s in (yes, no))


def run_inputs_of(model_name: str) -> dict | None:
    """For an sft-gap run's ``final/`` (or a checkpoint) whose run folder kept ``eval_args.json``: {"folder": the run
    folder, "args": the saved settings}; else None."""
    if not os.path.isdir(model_name) or not is_gap_run_folder(model_name):
        return None
    folder = os.path.dirname(os.path.abspath(model_name))
    path = os.path.join(folder, EVAL_ARGS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {"folder": folder, "args": json.load(f)}


def dataset_request(args: EvalGapScriptArguments, spec: str | None = None) -> DatasetRequest:
    """``--dataset`` (or ``spec``) and the options that shape its records, for the one resolver
    (:mod:`loopalign.data.load`): ``data_seed`` seeds generated problems (apart from any run's), statements are held
    out as sft-gap holds them out (30% of the entities), a source is built into ``output_dir/data``."""
    model = args.model_name_or_path
    table = spec is None and args.dataset_columns is not None  # the train-split probe's records are never a table
    return args.dataset_request(
        spec or args.dataset or default_dataset(model),
        model,
        os.path.join(args.output_dir or default_output_dir(model), "data"),
        table=table,
        limit=None if table else args.dataset_limit,  # your own table is read whole
        eval_fraction=STATEMENT_EVAL_FRACTION,
        seed=args.data_seed,
        synthetic_levels=parse_synthetic_levels(args.synthetic_levels),
    )


def default_dataset(model_name: str) -> str:
    """eval-gap's dataset when none is given: a digit-task organism's held-out tasks, else synthetic arithmetic."""
    if model_name in ORGANISM_MODELS and organism_tasks(organism_config_for(model_name)) is not None:
        return "organism"
    return "synthetic"


def load_records(args: EvalGapScriptArguments, tokenizer):
    """-> (records, group_by): the records ``--dataset`` names (:func:`loopalign.data.load.load_dataset`), or the
    model's default."""
    organism = organism_tasks(organism_config_for(args.model_name_or_path))
    return load_dataset(dataset_request(args), tokenizer, organism=organism)


#: the share of statement entities held out, as sft-gap's default eval_fraction holds them out
STATEMENT_EVAL_FRACTION = 0.3


def default_output_dir(model_name: str) -> str:
    """``outputs/eval_gap_<model>``, one folder per model so a second model never overwrites the first: a local
    model by its name (``organism``), a hub id with ``/`` as ``--`` (``ByteDance--Ouro-1.4B``), a folder or file by
    its last two path parts (``run-final``, a ``.gguf`` without its suffix)."""
    if is_local_model(model_name):
        slug = model_name
    elif os.path.exists(model_name):
        path = os.path.abspath(model_name)
        stem = os.path.splitext(os.path.basename(path))[0] if os.path.isfile(path) else os.path.basename(path)
        slug = f"{os.path.basename(os.path.dirname(path))}-{stem}"
    else:
        slug = model_name.strip("/").replace("/", "--")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", slug).strip("._") or "model"
    return f"outputs/eval_gap_{slug}"


def load_probe_train_records(args: EvalGapScriptArguments, tokenizer):
    """The train-split probe's records (``--probe_train_dataset``), or None: 'train' is the statement entities
    sft-gap trains on, anything else a spec read whole."""
    if args.probe_train_dataset is None:
        return None
    if args.probe_train_dataset == "train":
        return load_dataset_splits(dataset_request(args), tokenizer)[0]
    return load_dataset(dataset_request(args, args.probe_train_dataset), tokenizer)[0]


def retrofitted(model, block: tuple[int, int]):
    """``model`` (a plain Llama-family LM) looped with layers ``block`` as the recurrent block and the 'sum' adapter
    (one loop is ``model``); a ConfigError naming --retrofit when the model is looped or too shallow for it."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if is_looped(model) or layers is None:
        raise ConfigError(f"--retrofit loops a plain Llama-family LM; {type(model).__name__} is not one")
    if block[1] > len(layers):
        raise ConfigError(f"--retrofit {block[0]}-{block[1]}: the model has {len(layers)} layers")
    spec = RetrofitConfig(
        prelude=(0, block[0]), recurrent=block, coda=(block[1], len(layers)), adapter_init="sum", init_scale=0.0
    )
    return retrofit_recurrence(model, spec).eval()


def evaluate(args: EvalGapScriptArguments) -> GapResult:
    """The recipe on parsed arguments: load, measure, write (and compare with ``args.compare``)."""
    model_name = args.model_name_or_path
    out_dir = args.output_dir or default_output_dir(model_name)
    set_cpu_threads(on_cpu=args.device == "cpu" or None, announce=True)
    frozen = None
    if args.compare:
        compare_config = CompareConfig(loops=args.verdict_depth, seed=args.seed, rr_tolerance=args.rr_tolerance)
        print(compare_config.rule())  # the rule, before any figure
        # the before-evaluation's per-fold probes, frozen, on this model's features (the verdict's drift check)
        before_dir = args.compare if os.path.isdir(args.compare) else os.path.dirname(args.compare) or "."
        frozen = load_frozen_probes(before_dir, required=False)
    if args.run_inputs is not None:
        print(f"an sft-gap run's adapters: evaluated on its held-out records with its settings ({args.dataset})")
    model, tok = load_model(model_name, device=args.device, dtype=args.dtype, seed=args.seed)
    if args.retrofit is not None:
        model = retrofitted(model, args.retrofit_block())
        print(f"retrofitted: {model.config.retrofit}")
    data, group_by = load_records(args, tok)
    group_by = args.group_by or group_by
    probe_train = load_probe_train_records(args, tok)
    loops = (
        parse_loop_counts(args.eval_loops, "eval_loops")
        if args.eval_loops is not None
        else default_eval_loops(model.config)
    )
    config = args.gap_config(
        loops=loops,
        batch_size=args.per_device_eval_batch_size,
        seed=args.seed,
        group_by=group_by,
        verdict_tokens=args.verdict(),
    )
    result = evaluate_gap(
        model,
        tok,
        data,
        config=config,
        out_dir=out_dir,
        wandb="wandb" in args.report_to,
        wandb_kwargs={"project": args.wandb_project, "name": f"eval_gap:{model_name}"},
        frozen_probes=frozen,
        probe_train_dataset=probe_train,
    )
    print(result.markdown())
    if args.compare:
        before = GapResult.from_json(args.compare)
        comp = compare(before, result, compare_config)
        atomic_write_text(f"{out_dir}/compare.json", comp.to_json())
        atomic_write_text(f"{out_dir}/compare.md", comp.markdown())
        title = f"{model_name} against {args.compare}: verdict {comp.outcome}"
        save_figure(before_after_figure(before, result, comp.depth, title=title), out_dir, "before_after")
        print(comp.verdict)
    print(f"wrote {out_dir}")
    return result


def build_parser(argv: list[str] | None = None):
    """The script's ``TrlParser`` (EvalGapScriptArguments; YAML with ``--config``)."""
    return make_parser((EvalGapScriptArguments,), __doc__)


def main(argv: list[str] | None = None) -> int:
    """``recipes/eval_gap.py`` / ``loopalign eval-gap``: parse ``argv`` (default ``sys.argv[1:]``) and evaluate."""
    command_console()
    argv = sys.argv[1:] if argv is None else argv
    (args,) = parse_or_exit(build_parser(argv), argv)
    evaluate(args)
    return 0
