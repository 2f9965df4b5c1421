"""Argument dataclasses and parsing helpers shared by the scripts: one option dialect everywhere.

Loop options follow :mod:`loopalign.loops`: ``eval_loops`` / ``eval_tp_loops`` are 1-based loop
counts ("run n loops", :func:`~loopalign.loops.parse_loop_counts`); ``lora_loops`` and the
injection options are 0-based loop indices (:func:`~loopalign.loops.parse_loop_indices`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import TrlParser

from loopalign.data.load import DatasetRequest
from loopalign.data.schema import SCENARIOS
from loopalign.data.sources.table import parse_column_map
from loopalign.errors import ConfigError
from loopalign.eval import CompareConfig, FeatureConfig, GapConfig, ReadoutConfig, TaskConfig
from loopalign.loading import is_local_model
from loopalign.log import command_console
from loopalign.loops import parse_int_set, parse_loop_counts

__all__ = [
    "GapEvalArguments",
    "cpu_device",
    "default_eval_loops",
    "reporting_targets",
    "SHIPPED_CONFIGS",
    "apply_cpu_default",
    "cpu_default_config",
    "parse_strengths",
    "make_parser",
    "CommandParser",
    "config_by_dest",
    "lora_targets_as_names",
    "parse_or_exit",
    "run_build_command",
    "parse_synthetic_levels",
]

_GAP = GapConfig()
_READOUT = ReadoutConfig()


def parse_synthetic_levels(value: str) -> tuple[int, ...]:
    """``--synthetic_levels`` ('1,2') -> (1, 2); anything but levels in 1..6 fails, naming the option."""
    try:
        levels = tuple(int(x) for x in value.split(",") if x.strip())
    except (AttributeError, ValueError):
        levels = ()
    if not levels or any(not 1 <= x <= 6 for x in levels):
        raise ConfigError(f"synthetic_levels must be levels in 1..6 (e.g. '1,2'), got {value!r}")
    return levels


def default_eval_loops(model_config) -> list[int]:
    """The loop counts evaluated when ``eval_loops`` is unset: 1 to the model's trained depth + 2
    (``total_ut_steps``; the organism: 1-6) for a looped model, ``[1]`` for a plain causal LM (one loop)."""
    depth = getattr(model_config, "total_ut_steps", None)
    return list(range(1, int(depth) + 3)) if depth else [1]


#: what an sft-gap run keeps so that ``loopalign eval-gap --model_name_or_path RUN/final`` re-evaluates its adapters on
#: the same records with the same settings: the held-out records, the train-split probe's records, the settings
HELDOUT_FILE, TRAIN_SPLIT_FILE, EVAL_ARGS_FILE = "heldout.jsonl", "train_split.jsonl", "eval_args.json"


@dataclass
class GapEvalArguments:
    """The gap evaluation (SV / RR / gap / TP per loop) of ``eval_gap`` and of ``sft_gap``'s before/after
    evaluation: the same names and defaults in both."""

    eval_loops: str | None = field(
        default=None,
        metadata={"help": "Loop counts evaluated (1-based, e.g. 1-8 or 1,2,4); default 1 to the model's depth + 2."},
    )
    eval_tp_loops: str | None = field(default=None, metadata={"help": "Loop counts of TP (default: eval_loops)."})
    eval_tp: bool = field(default=True, metadata={"help": "Measure TP (greedy answers to the tasks) per loop."})
    tp_max_new_tokens: int | None = field(
        default=None, metadata={"help": "New tokens per TP answer (default: enough for the source; GSM8K 512)."}
    )
    eval_n_boot: int = field(default=_GAP.n_boot, metadata={"help": "Bootstrap resamples of the CIs."})
    eval_readout: str = field(
        default="kfold", metadata={"help": "RR probe split: kfold (every record scored) | holdout (train/val/test)."}
    )
    eval_folds: int = field(default=_READOUT.folds, metadata={"help": "Folds of eval_readout=kfold (>= 3)."})
    eval_position: str = field(
        default=str(_READOUT.position),
        metadata={"help": "RR probe position: verdict | answer_end | concat | an index into probe_indices."},
    )
    dataset_columns: str | None = field(
        default=None,
        metadata={
            "help": "Read --dataset as your own .jsonl / .csv with this column map, rendered with the model's chat "
            "template: 'task=q,answer=a,label=y[,gold=g,cluster=c]' or 'statement=s,label=y[,cluster=c]' "
            "(docs/data.md). Unset: --dataset is a build, a saved dataset or rendered records."
        },
    )
    dataset_scenario: str | None = field(
        default=None,
        metadata={
            "help": "Scenario of --dataset_columns rows: math | safety | statement (default: statement when "
            "the map has a statement column, else math)."
        },
    )
    skip_invalid_rows: bool = field(
        default=False,
        metadata={
            "help": "With --dataset_columns: leave out (and count) rows that fail validation instead of failing."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a SOURCE:HUB_NAME dataset."})
    candidates: str = field(
        default="controlled",
        metadata={"help": "Answers of a SOURCE:PATH problem source: controlled | sampled (by the model)."},
    )
    field_map: str = field(default="beavertails", metadata={"help": "Field map of safety-pairs sources."})
    eval_layers: str | None = field(
        default=None,
        metadata={
            "help": "Layers RR may read (0-based, e.g. 12-29 or 18; the model's layer count L = its final normed "
            "state); RR selects the best per loop among them and the report shows RR per layer. Default: all."
        },
    )
    eval_fixed_layer: int | None = field(
        default=None,
        metadata={
            "help": "Layer of the fixed-layer readout (rr_fixed). Default: the normed state L, or the deepest of "
            "eval_layers when they are given."
        },
    )
    metric: str = field(
        default=_GAP.metric, metadata={"help": "Headline metric: auto | accuracy | balanced_accuracy | f1 | auroc."}
    )
    min_minority_share: float = field(
        default=_GAP.min_minority_share, metadata={"help": "Labels count as unbalanced below this minority share."}
    )
    sv_decision: str = field(
        default=_GAP.sv_decision, metadata={"help": "SV decision: forced (P(yes) > P(no)) | strict (vocab argmax)."}
    )
    sampled_verdict: bool = field(
        default=_GAP.sampled_verdict, metadata={"help": "Also generate the verdict text per loop."}
    )
    controls: bool = field(
        default=_GAP.controls, metadata={"help": "Shortcut controls: question-only, author and noise probes."}
    )
    all_sites_probe: bool = field(
        default=_GAP.all_sites_probe,
        metadata={
            "help": "A stronger yardstick beside RR: one probe per loop over every layer RR may read x both probe "
            "positions (rr_all_sites in gap.md; compare.md sets SV after against it)."
        },
    )
    train_split_records: int = field(
        default=_GAP.train_split_records,
        metadata={
            "help": "The train-split probe (a stronger yardstick beside RR, fitted on labelled training records "
            "the evaluation never scores; rr_train_split in gap.md, compare.md sets SV after against it): at most "
            "this many of them, whole clusters (0: all)."
        },
    )
    author_field: str = field(
        default=str(_GAP.author_field),
        metadata={"help": "Record field naming each answer's author for the author control (auto | none | a field)."},
    )
    rr_tolerance: float = field(
        default=CompareConfig().rr_tolerance,
        metadata={"help": "Before/after verdict: RR counts as preserved if dRR's CI low end > -this."},
    )

    def dataset_request(self, spec: str, model: str, build_dir: str, table: bool = True, **shape) -> DatasetRequest:
        """``spec`` with this command's data options (your table's columns, scenario and bad-row choice, unless
        ``table`` is False; a source's answers, field map and split, built into ``build_dir`` and rendered for
        ``model``) and ``shape`` (limit, seed, eval_fraction, synthetic_levels, max_length: where the commands
        differ) for the one resolver, :mod:`loopalign.data.load`."""
        return DatasetRequest(
            spec=spec,
            columns=self.dataset_columns if table else None,
            scenario=self.dataset_scenario,
            skip_invalid=self.skip_invalid_rows,
            candidates=self.candidates,
            policy=model,
            field_map=self.field_map,
            split=self.dataset_split,
            tokenizer_name="local" if is_local_model(model) else model,
            build_dir=build_dir,
            **shape,
        )

    def __post_init__(self):
        # checked here, before any model loads, each error naming the option
        if self.eval_loops is not None:
            parse_loop_counts(self.eval_loops, "eval_loops")
        if self.eval_tp_loops is not None:
            parse_loop_counts(self.eval_tp_loops, "eval_tp_loops")
        if self.eval_readout not in ("kfold", "holdout"):
            raise ConfigError(f"eval_readout must be 'kfold' or 'holdout', got {self.eval_readout!r}")
        if self.eval_n_boot < 10:
            raise ConfigError(f"eval_n_boot must be >= 10, got {self.eval_n_boot}")
        if self.tp_max_new_tokens is not None and self.tp_max_new_tokens < 1:
            raise ConfigError(f"tp_max_new_tokens must be >= 1 (or unset), got {self.tp_max_new_tokens}")
        if self.dataset_columns is not None:
            parse_column_map(self.dataset_columns)  # a bad map fails here, naming the column
        if self.candidates not in ("controlled", "sampled"):
            raise ConfigError(f"candidates must be 'controlled' or 'sampled', got {self.candidates!r}")
        if self.dataset_scenario is not None and self.dataset_scenario not in SCENARIOS:
            raise ConfigError(f"dataset_scenario must be one of {SCENARIOS}, got {self.dataset_scenario!r}")
        if self.eval_layers is not None:
            parse_int_set(self.eval_layers, "eval_layers", what="0-based layer indices", example="'12-29' or '18'")
        if self.eval_fixed_layer is not None:
            if self.eval_fixed_layer < 0:
                raise ConfigError(f"eval_fixed_layer must be a layer index >= 0, got {self.eval_fixed_layer}")
            if self.eval_layers is not None and self.eval_fixed_layer not in self.layers():
                raise ConfigError(
                    f"eval_fixed_layer={self.eval_fixed_layer} is not among eval_layers={self.eval_layers!r}"
                )
        self.gap_config(loops=[1], batch_size=1, seed=0)  # GapConfig / ReadoutConfig validate the rest

    def layers(self) -> list[int] | None:
        """The layers RR reads (``eval_layers``), or None for all of them."""
        if self.eval_layers is None:
            return None
        return list(parse_int_set(self.eval_layers, "eval_layers"))

    def gap_config(self, *, loops: Sequence[int], batch_size: int, seed: int, **overrides) -> GapConfig:
        """The :class:`GapConfig` these options describe; ``loops``: the resolved loop counts
        (``eval_loops`` or :func:`default_eval_loops`); ``overrides``: GapConfig fields set by the script."""
        position = int(self.eval_position) if self.eval_position.lstrip("-").isdigit() else self.eval_position
        layers = self.layers()
        fixed_layer = self.eval_fixed_layer if self.eval_fixed_layer is not None or layers is None else max(layers)
        kwargs = dict(
            loops=list(loops),
            metric=self.metric,
            min_minority_share=self.min_minority_share,
            sv_decision=self.sv_decision,
            n_boot=self.eval_n_boot,
            seed=seed,
            features=FeatureConfig(batch_size=batch_size, layers=layers),
            readout=ReadoutConfig(
                split=self.eval_readout, folds=self.eval_folds, position=position, seed=seed, fixed_layer=fixed_layer
            ),
            task=TaskConfig(max_new_tokens=self.tp_max_new_tokens, batch_size=batch_size) if self.eval_tp else None,
            tp_loops=self.eval_tp_loops,
            sampled_verdict=self.sampled_verdict,
            controls=self.controls,
            all_sites_probe=self.all_sites_probe,
            train_split_records=self.train_split_records,
            author_field=None if self.author_field.lower() == "none" else self.author_field,
        )
        kwargs.update(overrides)
        return GapConfig(**kwargs)


#: where a command without a trainer can report (sft-gap's report_to is TRL's and takes what TRL takes)
REPORT_TARGETS = ("wandb",)


def reporting_targets(report_to) -> list[str]:
    """``report_to`` as sft-gap (TRL) spells it, for the commands without a trainer: a list of targets (a single
    name from YAML reads as a list of one), ``none`` or nothing for none. An unknown target fails, naming it."""
    values = [report_to] if isinstance(report_to, str) else list(report_to or [])
    values = [v for v in values if v != "none"]
    bad = [v for v in values if v not in REPORT_TARGETS]
    if bad:
        raise ConfigError(f"report_to: {bad[0]!r} is not one of {', '.join(REPORT_TARGETS)} (or none)")
    return values


def cpu_device(device: str | None, use_cpu: bool) -> str | None:
    """The device of a command that takes both ``--device`` and sft-gap's (TRL's) ``--use_cpu``: ``use_cpu`` is
    ``--device cpu``; asking for both the CPU and another device fails, naming both."""
    if not use_cpu:
        return device
    if device not in (None, "cpu"):
        raise ConfigError(f"use_cpu=true and device={device!r} ask for two devices; give one of them")
    return "cpu"


#: the first line of every command's usage: the options are listed under it, loopalign's own first
USAGE = "%(prog)s [--config YAML] [--OPTION VALUE ...]"
#: the help sections of a command's options
OWN_SECTION = "loopalign options"
INHERITED_SECTION = "TRL and transformers options (inherited; see their documentation)"


def _own_annotations(dataclass_types: Sequence[type]):
    """(name, type hint as written) of every field that loopalign's own classes declare among ``dataclass_types``."""
    for dtype in dataclass_types:
        for cls in dtype.__mro__:
            if cls.__module__.split(".")[0] == "loopalign":
                yield from vars(cls).get("__annotations__", {}).items()


def own_fields(dataclass_types: Sequence[type]) -> set[str]:
    """The option names that loopalign's own classes declare among ``dataclass_types`` (a loopalign subclass of
    TRL's ``SFTConfig`` declares some; TRL's ``ModelConfig`` none)."""
    return {name for name, _ in _own_annotations(dataclass_types)}


def _sections(parser: argparse.ArgumentParser, own: set[str]) -> None:
    """Regroup the options: loopalign's own under :data:`OWN_SECTION` (first, with how ``--config`` reads a YAML),
    the inherited ones under :data:`INHERITED_SECTION` (argparse keeps a group's actions in ``_group_actions``:
    moving them between groups changes the help only, never the parsing)."""
    groups = getattr(parser, "_action_groups", None)
    if not groups or not all(hasattr(g, "_group_actions") for g in groups):
        return  # another argparse: one section, as before
    first = parser.add_argument_group(
        OWN_SECTION, "--config YAML reads any option below from a YAML file; options given here override it."
    )
    rest = parser.add_argument_group(INHERITED_SECTION)
    for group in groups[:-2]:
        for action in list(group._group_actions):
            if not action.option_strings or action.dest == "help":
                continue
            group._group_actions.remove(action)
            (first if action.dest in own or action.dest.removeprefix("no_") in own else rest)._group_actions.append(
                action
            )
    groups.remove(first)
    groups.remove(rest)
    groups[1:1] = [first] + ([rest] if rest._group_actions else [])


def parse_strengths(value, option: str = "strengths") -> tuple[float, ...]:
    """``"1,2,4,8"`` -> (1.0, 2.0, 4.0, 8.0): injection strengths, each a number > 0; else a ConfigError naming
    ``option``."""
    try:
        strengths = tuple(float(s) for s in str(value).split(","))
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers (e.g. 1,2,4,8), got {value!r}") from None
    if any(not x > 0 for x in strengths):
        raise ConfigError(f"{option} must be numbers > 0, got {value!r}")
    return strengths


#: the shipped configs: ``<command>_cpu_default.yaml``, the one home of a command's CPU default (what runs without
#: ``--config``; recipes/configs/ links to them)
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cpu_default_config(command: str) -> Path:
    """The shipped CPU default of ``command`` (``sft_gap``, ``grpo_introspection``, ``eval_introspection``)."""
    path = SHIPPED_CONFIGS / f"{command}_cpu_default.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shipped CPU default of {command} is missing (a broken install?)")
    return path


def apply_cpu_default(parser: TrlParser, command: str) -> None:
    """Make ``command``'s shipped CPU default YAML the parser's defaults, as ``--config`` would (command-line
    options still override it)."""
    with open(cpu_default_config(command)) as f:
        parser.set_defaults(**yaml.safe_load(f))


def config_by_dest(parser: argparse.ArgumentParser, config: dict) -> dict:
    """A ``--config`` YAML's keys as the options' names (``dest``): a key may be any spelling the command line
    takes, without the dashes (an alias such as ``output_dir`` for ``out``, or ``per-family`` for
    ``per_family``); a ``--no_X`` flag is no key (write ``X: false``). Unknown keys stay as they are (TRL then
    names them); two spellings of one option fail, naming both."""
    dest_of: dict[str, str] = {}
    for action in parser._actions:
        if action.nargs == 0:  # --help, --no_X (store_false): no value to take from a YAML
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                dest_of.setdefault(option[2:], action.dest)
    dest_of.update({action.dest: action.dest for action in parser._actions})  # an option's own name is itself
    out: dict = {}
    spelled: dict[str, str] = {}
    for key, value in config.items():
        dest = dest_of.get(key, key) if isinstance(key, str) else key
        if dest in out:
            raise ConfigError(f"--config: {spelled[dest]!r} and {key!r} are the same option ({dest}); give it once")
        out[dest], spelled[dest] = value, key
    return out


class CommandHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' help layout: the description as written, and an option with several spellings shown once with
    its value (``--eval_loops, --eval-loops EVAL_LOOPS``, Python 3.13's form, on every Python), so that the help
    shipped in ``loopalign_cli/help/`` is the same text whichever Python writes or checks it."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(action.option_strings) + " " + value


class CommandParser(TrlParser):
    """TRL's ``TrlParser`` whose ``--config`` YAML takes an option by any of its command-line spellings
    (:func:`config_by_dest`)."""

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        return super().set_defaults_with_config(**config_by_dest(self, kwargs))


def make_parser(dataclass_types: Sequence[type], doc: str | None, prog: str | None = None) -> TrlParser:
    """A ``TrlParser`` (YAML with ``--config`` + CLI overrides) over ``dataclass_types``, the script's
    docstring as its description; a one-line usage, and the help lists loopalign's own options before the ones
    inherited from TRL and transformers. ``prog``: the name in the usage line and errors (default: argparse's,
    from ``sys.argv[0]``, which ``loopalign <command>`` sets to ``loopalign <command>``)."""
    kwargs = {} if prog is None else {"prog": prog}
    parser = CommandParser(
        tuple(dataclass_types),
        description=doc,
        usage=USAGE,
        formatter_class=CommandHelpFormatter,
        **kwargs,
    )
    _sections(parser, own_fields(dataclass_types))
    _none_clears_optional(parser, dataclass_types)
    return parser


def _optional_own_fields(dataclass_types: Sequence[type]) -> set[str]:
    """loopalign's own fields among ``dataclass_types`` whose type admits None (``X | None``), bools and lists
    (one value an item) excepted."""
    names: set[str] = set()
    for name, hint in _own_annotations(dataclass_types):
        parts = {p.strip() for p in str(hint).split("|")}
        if "None" in parts and "bool" not in parts and not any(p.startswith("list") for p in parts):
            names.add(name)
    return names


def _none_or(convert: Callable | None) -> Callable:
    def parse(value):
        if isinstance(value, str) and value.strip().lower() == "none":
            return None
        return value if convert is None else convert(value)

    parse.__name__ = getattr(convert, "__name__", "str")  # argparse names the type in "invalid <type> value"
    return parse


def _none_clears_optional(parser: argparse.ArgumentParser, dataclass_types: Sequence[type]) -> None:
    """``--X none`` (any case) sets an option of loopalign's whose type admits None to None: the command line's
    way to clear a value a ``--config`` YAML set (the YAML's own is ``X: null``), e.g. ``--distill_center_field
    none`` when a run drops probe_distill. Inherited options keep TRL's and transformers' parsing (there
    ``report_to none`` has a meaning of its own)."""
    optional = _optional_own_fields(dataclass_types)
    for action in parser._actions:
        if action.dest in optional and action.option_strings and action.nargs != 0:
            action.type = _none_or(action.type)


def lora_targets_as_names(model_args) -> None:
    """TRL's ``ModelConfig`` turns a one-element ``lora_target_modules`` into a plain string (so that
    ``all-linear`` works), and PEFT reads a string as a regular expression over the whole module path: one
    module name (``--lora_target_modules q_proj``) then matches no module at all. A string that is a module name
    (letters, digits, ``_`` and ``.``) goes back into a list; ``all-linear`` and real patterns stay as given."""
    targets = getattr(model_args, "lora_target_modules", None)
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[A-Za-z0-9_.]+", targets):
        model_args.lora_target_modules = [targets]


def parse_or_exit(parser: TrlParser, argv: Sequence[str]) -> tuple:
    """``parser.parse_args_and_config(argv)``; an invalid value (a dataclass's ``ValueError``) ends the
    script with the usage line and the message (exit status 2), not a traceback. One LoRA target module stays a
    name (:func:`lora_targets_as_names`)."""
    try:
        parsed = parser.parse_args_and_config(args=list(argv))
    except ValueError as e:
        parser.error(str(e))
    for args in parsed:
        lora_targets_as_names(args)
    return parsed


#: what a data build may fail with once its options are valid (the message is the error: no traceback); a bad record
#: (``RecordError``) is a ValueError
BUILD_ERRORS = (ValueError, FileExistsError, RuntimeError, FileNotFoundError)


def run_build_command(
    parser: TrlParser,
    argv: Sequence[str] | None,
    build: Callable,
    summary: Callable[[dict], dict],
    indent: int | None = 1,
) -> int:
    """A data builder's ``main``: parse ``argv`` (default ``sys.argv[1:]``; a bad value exits 2 naming its option),
    run ``build`` on the parsed options, print ``{"out": ..., **summary(meta)}`` as JSON (``indent``). -> 0, or 2
    with ``error: ...`` on stderr when the build fails (:data:`BUILD_ERRORS`)."""
    command_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = parse_or_exit(parser, argv)
    try:
        meta = build(args)
    except BUILD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **summary(meta)}, indent=indent))
    return 0
