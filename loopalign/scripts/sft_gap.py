"""Gap SFT: train LoRA adapters on a looped model so that self-verification (SV) catches up with
the representation readout (RR), per loop, without RR degrading, and measure it before and after.

    accelerate launch recipes/sft_gap.py                                  # the shipped CPU default (the organism), minutes
    accelerate launch recipes/sft_gap.py --config recipes/configs/sft_gap_ouro_1.4b_gsm8k.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/sft_gap.py --config ...
    loopalign sft-gap --config recipes/configs/sft_gap_cpu_default.yaml --max_steps 300   # one process

``--dataset`` is read by the resolver eval-gap uses (:mod:`loopalign.data.load`; docs/data.md, "The --dataset
vocabulary"). Arguments: the script's (GapScriptArguments: data; GapEvalArguments: the before/after evaluation),
GapSFTConfig (TRL's SFTConfig + the loop-aware objective) and TRL's ModelConfig, from YAML
(``--config``) with command-line overrides. Writes into ``output_dir``: the adapters, probes and
settings (``final/``), ``before/`` and ``after/`` gap reports (JSON, Markdown, PNG/SVG plots), and
``compare.md`` / ``compare.json`` with the verdict, and ``timings.json`` (the wall time of each phase: load,
data, before-eval, replay, train, after-eval; printed at the end); logs the same to W&B with ``report_to: wandb``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from trl import ModelConfig, get_peft_config

import loopalign  # noqa: F401  (registers Ouro with the Auto classes)
from loopalign.data.load import (
    DATASET_HELP,
    DatasetRequest,
    dataset_kind,
    load_dataset_splits,
    statement_families_of,
)
from loopalign.data.replay_questions import load_replay_questions
from loopalign.errors import ConfigError
from loopalign.eval import (
    CompareConfig,
    GapResult,
    compare,
    evaluate_gap,
    load_frozen_probes,
    log_comparison_wandb,
)
from loopalign.eval.families import TRANSFER_RULE, compare_families, record_families
from loopalign.eval.features import reused_features
from loopalign.eval.general import answer_general_questions, general_drift, general_markdown, save_general
from loopalign.eval.metrics import auroc
from loopalign.eval.report import before_after_figure, save_figure, short_markdown
from loopalign.io import atomic_write, atomic_write_text, folder_lock
from loopalign.loading import is_local_model, load_model, load_pretrained, load_tokenizer
from loopalign.log import command_console, get_logger
from loopalign.loops import parse_int_set, parse_loop_counts
from loopalign.models.contract import trained_loops
from loopalign.organism import DIGIT_GROUP_FIELD, organism_config_for, organism_tasks
from loopalign.scripts.args import (
    EVAL_ARGS_FILE,
    HELDOUT_FILE,
    TRAIN_SPLIT_FILE,
    GapEvalArguments,
    apply_cpu_default,
    default_eval_loops,
    make_parser,
    parse_or_exit,
    parse_synthetic_levels,
)
from loopalign.speed import cpu_bf16_is_native, set_cpu_threads
from loopalign.trainers import GapSFTConfig, GapSFTTrainer, self_replay_dataset, write_adapter_card
from loopalign.trainers.console import use_short_console_log
from loopalign.trainers.probe_targets import PROBE_LABEL, labelled_subset

logger = get_logger(__name__)

#: the replay records a run trained on (the base model's own answers), in its output folder
REPLAY_FILE = "replay.jsonl"


@dataclass
class GapScriptArguments(GapEvalArguments):
    """What to train on (and, inherited from GapEvalArguments, how the before/after evaluation measures)."""

    dataset: str = field(
        default="synthetic",
        metadata={"help": DATASET_HELP + " Default: synthetic. 'organism' trains on its training tasks."},
    )
    dataset_limit: int | None = field(
        default=None,
        metadata={
            "help": "Problems / rows read (synthetic: 160; organism: 1000 distinct tasks; statements: per family, 300)."
        },
    )
    synthetic_levels: str = field(default="1,2", metadata={"help": "Difficulty levels of the synthetic source."})
    eval_fraction: float = field(default=0.3, metadata={"help": "Share of tasks held out for the before/after eval."})
    lora_layers: str | None = field(
        default=None,
        metadata={
            "help": "Decoder layers the LoRA adapters go on (0-based, e.g. 12-29; PEFT's layers_to_transform). "
            "Default: every layer. With adapters on the top layers only, --prefix_cache true skips the rest."
        },
    )
    family_field: str = field(
        default="family",
        metadata={
            "help": "Record field (or key of its JSON meta) naming each record's family (e.g. a statement family)."
        },
    )
    heldout_families: str | None = field(
        default=None,
        metadata={
            "help": "Families never trained on (comma-separated values of family_field; 'none': no family): their "
            "held-out entities are evaluated, per family, before and after training, with the transfer summary "
            "(families.md)."
        },
    )
    unlabeled_families: str | None = field(
        default=None,
        metadata={
            "help": "Families whose training records are trained on without their labels (comma-separated; 'none': "
            "no family): their "
            "text enters training unlabelled, taught by probe_distill alone (targets from a probe fitted on the "
            "labelled families); their held-out records are evaluated per family. Needs loss_weights.probe_distill > 0."
        },
    )
    probe_label_families: str | None = field(
        default=None,
        metadata={
            "help": "Families trained without their labels, like unlabeled_families, whose labels still fit the "
            "probe_distill target probe (comma-separated; 'none': no family): the targets come from a probe that saw "
            "them (out of fold), while no other term reads their labels. Needs loss_weights.probe_distill > 0."
        },
    )
    eval_by_family: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate and compare every family on its own (before/families/<family>/, families.md); "
            "on whenever heldout_families is set."
        },
    )
    transfer_goal: float = field(
        default=0.5, metadata={"help": "Transfer rule: the mean SV recovery on held-out families to reach (0-1]."}
    )
    train_split_probe: bool = field(
        default=False,
        metadata={
            "help": "Also fit, before and after, a probe on the run's labelled training records (train_split_records "
            "of them) and score the held-out ones with it: a stronger yardstick beside RR (rr_train_split), which "
            "reads the evaluation folds only. On in the shipped recipes (the CPU default and "
            "recipes/configs/*.yaml); it costs about one more RR fit per evaluation."
        },
    )
    general_questions: bool = field(
        default=False,
        metadata={"help": "Greedy answers to a fixed set of simple questions before and after training (general.md)."},
    )
    replay_keep_cut: bool = field(
        default=False,
        metadata={
            "help": "Replay: keep the base model's answers that tp_max_new_tokens cut off (its own text so far, no end "
            "of turn), for open-ended tasks such as a statement's 'Tell me about ...'."
        },
    )
    replay_tasks: int | None = field(
        default=None,
        metadata={
            "help": "Distinct training tasks whose own answers are replayed (loss_weights.replay > 0); None: all."
        },
    )
    replay_questions: str | None = field(
        default=None,
        metadata={
            "help": "Questions whose base-model answers are replayed too, beside the training tasks: 'general' (42 "
            "everyday questions, yes/no ones among them, none about a general-check question; "
            "loopalign.data.replay_questions) or a .txt file, one question a line. Needs loss_weights.replay > 0."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        parse_synthetic_levels(self.synthetic_levels)
        dataset_kind(self.dataset, self.dataset_columns)  # a dataset that names nothing fails before the model loads
        if not 0 < self.transfer_goal <= 1:
            raise ConfigError(f"transfer_goal must be in (0, 1], got {self.transfer_goal}")
        if not self.family_field.strip():
            raise ConfigError("family_field must name a record field")
        if _names_nothing(self.heldout_families):
            raise ConfigError(f"heldout_families must name families (comma-separated), got {self.heldout_families!r}")
        if _names_nothing(self.unlabeled_families):
            raise ConfigError(
                f"unlabeled_families must name families (comma-separated), got {self.unlabeled_families!r}"
            )
        if _names_nothing(self.probe_label_families):
            raise ConfigError(
                f"probe_label_families must name families (comma-separated), got {self.probe_label_families!r}"
            )
        named = {
            "heldout_families": self.heldout_family_names(),
            "unlabeled_families": self.unlabeled_family_names(),
            "probe_label_families": self.probe_label_family_names(),
        }
        for (first, a), (second, b) in itertools.combinations(named.items(), 2):
            both = sorted(set(a) & set(b))
            if both:
                raise ConfigError(f"families {both} are in both {first} and {second}: choose one")
        # statements' families are known before anything loads: a misspelt family fails here, not after the model
        known = statement_families_of(self.dataset) if self.family_field == "family" else None
        if known is not None:
            check_family_names(named, known, f"{self.dataset!r}: {known}")
        if self.lora_layers is not None:
            parse_int_set(self.lora_layers, "lora_layers", what="0-based layer indices", example="'12-29'")
        if self.replay_tasks is not None and self.replay_tasks < 1:
            raise ConfigError(f"replay_tasks must be >= 1 (or unset for all), got {self.replay_tasks}")
        if self.replay_questions is not None and self.replay_questions.strip().lower() in ("", "none"):
            self.replay_questions = None  # 'none' clears a YAML's value on the command line
        if self.replay_questions is not None:  # read now: a missing file or a blank line fails before the model loads
            load_replay_questions(self.replay_questions)

    def heldout_family_names(self) -> list[str]:
        return _family_names(self.heldout_families)

    def unlabeled_family_names(self) -> list[str]:
        return _family_names(self.unlabeled_families)

    def probe_label_family_names(self) -> list[str]:
        return _family_names(self.probe_label_families)

    def by_family(self) -> bool:
        return (
            self.eval_by_family
            or bool(self.heldout_family_names())
            or bool(self.unlabeled_family_names())
            or bool(self.probe_label_family_names())
        )


def _family_names(value: str | None) -> list[str]:
    """'a,b' -> ['a', 'b']; None or 'none' (to clear a YAML's value on the command line) -> []."""
    if value is None or value.strip().lower() == "none":
        return []
    return [f.strip() for f in value.split(",") if f.strip()]


def _names_nothing(value: str | None) -> bool:
    """A family option given but naming no family (e.g. ' , '): an error; 'none' says so on purpose."""
    return value is not None and value.strip().lower() != "none" and not _family_names(value)


def resume_target(value):
    """``--resume_from_checkpoint``: "true" / "false" (any case) as TRL's parser leaves them (strings)
    -> True (the latest complete checkpoint in output_dir) / None; a path stays a path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", ""):
        return None
    return value


def save_run_inputs(out: str, eval_ds, probe_train, script_args, training_args, model_args, gap_config) -> None:
    """The held-out records exactly as evaluated (``heldout.jsonl``), the train-split probe's records
    (``train_split.jsonl``), the evaluation settings eval-gap reads back (``eval_args.json``: every GapEvalArguments
    field, the resolved loops, grouping, seed, batch size and verdict tokens) and every argument of the run
    (``run_args.json``); each written atomically."""
    for name, ds in ((HELDOUT_FILE, eval_ds), (TRAIN_SPLIT_FILE, probe_train)):
        if ds is not None:
            atomic_write(os.path.join(out, name), lambda tmp, ds=ds: ds.to_json(tmp, lines=True))
    saved = {f.name: getattr(script_args, f.name) for f in dataclasses.fields(GapEvalArguments)}
    saved.update(
        eval_loops=",".join(str(t) for t in gap_config.loops),
        group_by=gap_config.group_by,
        seed=training_args.seed,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        verdict_yes=training_args.verdict_yes,
        verdict_no=training_args.verdict_no,
        dataset=HELDOUT_FILE,
        probe_train_dataset=TRAIN_SPLIT_FILE if probe_train is not None else None,
    )
    atomic_write_text(os.path.join(out, EVAL_ARGS_FILE), json.dumps(saved, indent=1))
    atomic_write_text(
        os.path.join(out, "run_args.json"),
        json.dumps(run_arguments(script_args, training_args, model_args), indent=1, default=str),
    )


def run_arguments(script_args, training_args, model_args) -> dict:
    """Every argument of a run as ``run_args.json`` holds it: {"script", "training", "model": {option: value}}."""
    return {
        "script": dataclasses.asdict(script_args),
        "training": training_args.to_dict(),
        "model": dataclasses.asdict(model_args),
    }


def check_resume_and_saving(training_args: GapSFTConfig) -> None:
    """``--resume_from_checkpoint`` names something to resume from, and ``--save_steps`` is not set beside a save
    strategy that saves nothing; checked before the model loads, each error naming the option."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    resume, out = resume_target(training_args.resume_from_checkpoint), training_args.output_dir
    if resume is True and (not os.path.isdir(out) or get_last_checkpoint(out) is None):
        raise ValueError(
            f"--resume_from_checkpoint true: no checkpoint-N folder in {out} to resume from (a run saves checkpoints "
            "with --save_strategy steps --save_steps N); drop the option to start afresh"
        )
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    default_steps = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "save_steps")
    strategy = getattr(training_args.save_strategy, "value", training_args.save_strategy)
    if strategy == "no" and training_args.save_steps != default_steps:
        raise ValueError(
            f"--save_steps {training_args.save_steps:g} with save_strategy 'no' (the default recipe's) saves "
            "nothing: add --save_strategy steps"
        )


def replay_records(model, tokenizer, train_ds, script_args: GapScriptArguments, training_args: GapSFTConfig):
    """The base model's own answers to the training tasks (the first ``replay_tasks`` distinct ones) and to the
    ``replay_questions``, as replay records; the main process writes them to ``output_dir/replay.jsonl``."""
    questions = load_replay_questions(script_args.replay_questions) if script_args.replay_questions else []
    build = self_replay_dataset(
        model,
        tokenizer,
        list(dict.fromkeys(train_ds["task"]))[: script_args.replay_tasks] + questions,
        num_loops=training_args.num_loops or trained_loops(model),
        max_new_tokens=script_args.tp_max_new_tokens,
        sources=sorted(set(train_ds["source"])) if "source" in train_ds.column_names else (),
        batch_size=training_args.per_device_eval_batch_size,
        keep_cut=script_args.replay_keep_cut,
    )
    replay = build.dataset
    if training_args.process_index == 0:  # what replay trains on, beside the run's other inputs
        os.makedirs(training_args.output_dir, exist_ok=True)
        atomic_write(os.path.join(training_args.output_dir, REPLAY_FILE), lambda tmp: replay.to_json(tmp, lines=True))
        asked = (
            f"prompts ({build.n_tasks - len(set(questions))} training tasks, {len(set(questions))} replay_questions)"
            if questions
            else "training tasks"
        )
        kept = "kept, without an end of turn" if script_args.replay_keep_cut else "left out"
        print(
            f"replay: the model's own answers to {len(replay)} of {build.n_tasks} {asked} "
            f"({build.n_cut} cut off at {build.max_new_tokens} new tokens and {kept})"
        )
    return replay


def check_against_data(training_args: GapSFTConfig, train_ds, eval_ds) -> None:
    """The options that depend on the data, checked before the first expensive step (the
    before-evaluation), each error naming the option (those that depend on the model are checked by
    ``GapSFTConfig.check_against_model`` right after the model loads)."""
    if training_args.max_length is not None:
        for name, ds in (("train", train_ds), ("held-out", eval_ds)):
            longest = max((len(ids) for ids in ds["input_ids"]), default=0)
            if longest + 2 > training_args.max_length:  # the verdict and the end of turn follow the prompt
                raise ValueError(
                    f"max_length={training_args.max_length} is shorter than the longest {name} record "
                    f"({longest} prompt tokens + the verdict and end of turn): raise max_length"
                )


def load_model_and_tokenizer(model_args: ModelConfig, training_args: GapSFTConfig):
    for option in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, option, False):
            raise ValueError(
                f"--{option} is not supported by sft_gap: quantised base weights under loop-aware LoRA are untested "
                "here; train in bf16 (the 1.4B configs fit one GPU)"
            )
    if training_args.push_to_hub:
        raise ValueError(
            "--push_to_hub is not supported by sft_gap: the Trainer would upload during training, before the "
            "after-evaluation and the verdict exist; upload output_dir/final/ with `huggingface-cli upload` once "
            "compare.md says what the run did"
        )
    name = model_args.model_name_or_path
    if is_local_model(name):  # the organism is built into the cache first when missing (by one process)
        with training_args.main_process_first(desc=f"loading the {name} model"):
            model, tokenizer = load_model(name, device="cpu")  # "tiny" is one model (seed 0): final/ can name it
        return model.train(), tokenizer
    model = load_pretrained(
        name,
        dtype=model_args.dtype or "auto",
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
    )
    return model, load_tokenizer(name, revision=model_args.model_revision)


def dataset_request(script_args: GapScriptArguments, model_name: str, training_args: GapSFTConfig) -> DatasetRequest:
    """``--dataset`` and the options that shape its records, for the one resolver (:mod:`loopalign.data.load`): the
    run's seed seeds generated problems, a source build and the task split; a source is built into
    ``output_dir/data``."""
    return script_args.dataset_request(
        script_args.dataset,
        model_name,
        os.path.join(training_args.output_dir, "data"),
        limit=script_args.dataset_limit,
        eval_fraction=script_args.eval_fraction,
        seed=training_args.seed,
        synthetic_levels=parse_synthetic_levels(script_args.synthetic_levels),
        max_length=training_args.max_length,
    )


def load_datasets(script_args: GapScriptArguments, model_name: str, tokenizer, training_args: GapSFTConfig):
    """(train, held-out) records of ``--dataset`` (:func:`loopalign.data.load.load_dataset_splits`)."""
    return load_dataset_splits(
        dataset_request(script_args, model_name, training_args),
        tokenizer,
        organism=organism_tasks(organism_config_for(model_name)),
    )


def lora_config(model_args: ModelConfig, script_args: GapScriptArguments, model_config):
    """TRL's PEFT config from the model arguments, with ``lora_layers`` as PEFT's ``layers_to_transform`` (each
    layer checked against the model's depth)."""
    config = get_peft_config(model_args)
    if script_args.lora_layers is None:
        return config
    if config is None:
        raise ValueError("lora_layers needs --use_peft true (it places LoRA adapters)")
    n = int(model_config.num_hidden_layers)
    config.layers_to_transform = list(parse_int_set(script_args.lora_layers, "lora_layers", maximum=n))
    return config


#: the column that keeps an unlabelled family's label for the probe-target diagnostic only
HIDDEN_LABEL = "hidden_label"


def probe_target_quality(features, train_ds, field_name: str) -> dict:
    """{family: {"auroc", "n", "taught_yes", "label_1"}}: how well the probe_distill targets (the last loop's) of the
    unlabelled records rank their hidden labels, per family (what probe distillation can teach there at best), the
    share of them the targets teach Yes (a target above 0.5) and the share truly label 1: far apart, the targets
    teach the verdict a shifted cut."""
    target = {i: t[-1] for i, t in zip(features["id"], features["probe_target"])}
    by_family: dict[str, tuple[list, list]] = {}
    for row, family in zip(train_ds, record_families(train_ds, field_name)):
        if row[HIDDEN_LABEL] is None or row["id"] not in target:
            continue
        ys, ps = by_family.setdefault(family, ([], []))
        ys.append(int(row[HIDDEN_LABEL]))
        ps.append(float(target[row["id"]]))
    return {
        f: {
            "auroc": float(auroc(np.array(y), np.array(p))),
            "n": len(y),
            "taught_yes": float(np.mean(np.array(p) > 0.5)),
            "label_1": float(np.mean(y)),
        }
        for f, (y, p) in sorted(by_family.items())
    }


def check_family_names(named: dict[str, list[str]], families, where: str) -> None:
    """A ConfigError naming the first option of ``named`` ({option: family names}) that names a family not in
    ``families``, and ``where`` (the dataset and the families it has, as the message shows them)."""
    for option, names in named.items():
        unknown = sorted(set(names) - set(families))
        if unknown:
            raise ConfigError(f"{option}: {unknown} are not families of the dataset {where}")


def family_eval_sets(script_args: GapScriptArguments, train_ds, eval_ds, training_args: GapSFTConfig):
    """-> (train, held-out records of the trained families, {family: its evaluation records}). Every family is
    evaluated on the same held-out entities (the split by task): ``heldout_families`` leave the training split (never
    trained on) and the pooled evaluation; ``unlabeled_families`` stay in training without labels. {} when not by
    family."""
    if not script_args.by_family():
        return train_ds, eval_ds, {}
    field_name, heldout = script_args.family_field, script_args.heldout_family_names()
    unlabeled, probe_only = script_args.unlabeled_family_names(), script_args.probe_label_family_names()
    train_families, eval_families = record_families(train_ds, field_name), record_families(eval_ds, field_name)
    every = sorted(set(train_families) | set(eval_families))
    options = {"heldout_families": heldout, "unlabeled_families": unlabeled, "probe_label_families": probe_only}
    check_family_names(options, every, f"({field_name!r}: {every})")
    if set(heldout) | set(unlabeled) | set(probe_only) >= set(every):
        raise ValueError(
            f"heldout_families={heldout}, unlabeled_families={unlabeled} and probe_label_families={probe_only} leave "
            "no family of the dataset whose labels are trained on"
        )
    if unlabeled or probe_only:
        if training_args.loss_weights["probe_distill"] <= 0:
            option = "unlabeled_families" if unlabeled else "probe_label_families"
            raise ValueError(
                f"{option} needs loss_weights.probe_distill > 0: no other term trains on unlabelled records"
            )
        hide = set(unlabeled) | set(probe_only)
        # the hidden label is kept beside the record for one diagnostic only (how good the probe targets of the
        # unlabelled families are, printed after they are fitted); no term reads it
        no_fit = set(unlabeled)

        def hidden(row, i):
            family = train_families[i]
            out = {
                "label": None if family in hide else row["label"],
                "labelled": family not in hide,
                HIDDEN_LABEL: row["label"] if family in hide else None,
            }
            if probe_only:  # the target probe's own labels: every family's but the unlabelled ones'
                out[PROBE_LABEL] = None if family in no_fit else row["label"]
            return out

        train_ds = train_ds.map(hidden, with_indices=True)
    # held-out families are never trained on: their training-split records are left out, their held-out entities
    # are evaluated on their own and leave the pooled evaluation
    held = set(heldout)
    train_ds = train_ds.select([i for i, f in enumerate(train_families) if f not in held])
    sets = {
        family: eval_ds.select([i for i, f in enumerate(eval_families) if f == family])
        for family in sorted(set(eval_families))
    }
    eval_ds = eval_ds.select([i for i, f in enumerate(eval_families) if f not in held])
    for family, part in sets.items():
        if len(set(part["label"])) < 2:
            raise ValueError(f"family {family!r} has {len(part)} evaluation records of one class: use more data")
        n_tasks = len(set(part["task"]))
        if script_args.eval_readout == "kfold" and n_tasks < script_args.eval_folds:
            raise ValueError(
                f"family {family!r} has {n_tasks} evaluation tasks, fewer than eval_folds={script_args.eval_folds} "
                "(its RR probes are fitted on its own folds): use more data or fewer folds"
            )
    return train_ds, eval_ds, sets


def labelled_training_records(train_ds, label_fraction: float, seed: int, group_by: str = "task"):
    """The training records whose labels the run may read, for the train-split probe: not those of families
    trained as text only (``labelled`` False), and under ``label_fraction`` < 1 the same labelled share the
    probe_distill targets use. None when they do not hold both classes (said so)."""
    keep = [i for i, row in enumerate(train_ds) if row["label"] is not None and row.get("labelled", True)]
    if label_fraction < 1.0 and "labelled" not in train_ds.column_names:
        rows = train_ds.select(keep)
        groups = [str(r.get(group_by) if r.get(group_by) is not None else r["id"]) for r in rows]
        chosen = labelled_subset(groups, np.asarray(rows["label"], dtype=np.int64), label_fraction, seed)
        keep = [i for i, k in zip(keep, chosen) if k]
    part = train_ds.select(keep)
    if len(set(part["label"])) < 2:
        print(f"train-split probe: left out ({len(part)} labelled training records, not both classes)")
        return None
    return part


def evaluate_families(
    model, tokenizer, family_sets: dict, gap_config, out_dir: str, resume=None, frozen_from: str | None = None
) -> dict:
    """{family: GapResult}: each family evaluated on its own records into ``out_dir/<family>/`` (a resumed run
    reuses the evaluations already there). ``frozen_from``: the before-evaluation's families folder, whose probes
    each family's after-evaluation applies frozen (the verdict's drift part)."""
    results = {}
    for family, part in family_sets.items():
        path = os.path.join(out_dir, family)
        if resume and os.path.exists(os.path.join(path, "gap.json")):
            results[family] = GapResult.from_json(path)
            continue
        print(f"family {family}: {len(part)} records")
        frozen = load_frozen_probes(os.path.join(frozen_from, family), required=False) if frozen_from else None
        results[family] = evaluate_gap(model, tokenizer, part, config=gap_config, out_dir=path, frozen_probes=frozen)
    return results


def prepare_reporting(training_args: GapSFTConfig) -> None:
    """Before anything expensive: W&B without an API key runs offline (said once, not a crash at
    ``trainer.train()``), and a sweep run writes into its own ``output_dir/sweep-<sweep>-<run>/``."""
    if "wandb" not in (training_args.report_to or []):
        return
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        netrc = os.path.expanduser("~/.netrc")
        logged_in = os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()
        if not logged_in:
            os.environ["WANDB_MODE"] = "offline"
            if training_args.process_index == 0:
                print("W&B: no API key, so the run is offline (wandb sync OUTPUT_DIR/wandb/... later)")
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run:
        training_args.output_dir = os.path.join(training_args.output_dir, f"sweep-{sweep}-{run}")
        if training_args.process_index == 0:
            print(f"W&B sweep {sweep}: this run writes to {training_args.output_dir}")


def train_and_compare(script_args: GapScriptArguments, training_args: GapSFTConfig, model_args: ModelConfig) -> None:
    """The recipe on parsed arguments: the output folder's lock around :func:`run`."""
    prepare_reporting(training_args)
    # one run per output folder: a second run into it fails at once, naming the holder
    lock = (
        folder_lock(training_args.output_dir, "sft_gap")
        if training_args.process_index == 0
        else contextlib.nullcontext()
    )
    with lock:
        run(script_args, training_args, model_args)


class PhaseTimes:
    """Wall seconds of the recipe's phases on this process, in order (``with times("train"): ...``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)

    def as_dict(self, **context) -> dict:
        """``{"phases": {name: s}, "total": s, **context}``; total includes what no phase covers."""
        return {"phases": dict(self.seconds), "total": round(time.perf_counter() - self.start, 3), **context}

    def line(self) -> str:
        d = self.as_dict()
        return ", ".join(f"{k} {v:.1f} s" for k, v in d["phases"].items()) + f"; total {d['total']:.1f} s"


def run(script_args: GapScriptArguments, training_args: GapSFTConfig, model_args: ModelConfig) -> None:
    """The recipe, top to bottom (``train_and_compare`` holds the output folder's lock around it)."""
    times = PhaseTimes()
    check_resume_and_saving(training_args)  # before any model work
    if script_args.replay_questions is not None and training_args.loss_weights["replay"] <= 0:
        raise ValueError(
            "replay_questions needs loss_weights.replay > 0: no other term trains on their answers (without replay, "
            "clear it: --replay_questions none)"
        )
    base_reading = training_args.base_reading_terms()
    if base_reading and not model_args.use_peft:
        raise ValueError(
            f"{' and '.join(base_reading)} compare the model with its base (the adapters switched off): they need "
            "--use_peft true"
        )
    if training_args.world_size > 1 and training_args.process_index == 0:
        print(f"{training_args.world_size} processes, {training_args.parallel_mode.value} (one model, data split)")
    cpu_threads = set_cpu_threads(on_cpu=training_args.use_cpu or None, announce=training_args.process_index == 0)
    if (
        cpu_threads is not None
        and training_args.bf16
        and cpu_bf16_is_native() is False
        and training_args.process_index == 0
    ):
        logger.warning(
            "bf16 autocast on this CPU is emulated (no amx_bf16 or avx512_bf16 flag): slower than float32; "
            "pass --bf16 false (docs/performance.md)"
        )
    with times("load"):
        model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    training_args.check_against_model(model.config)  # probe_layer, lora_loops, loop_weights: before any data
    lora_config(model_args, script_args, model.config)  # lora_layers against the model's depth, before any data
    with times("data"), training_args.main_process_first(desc="building the verification dataset"):
        train_ds, eval_ds = load_datasets(script_args, model_args.model_name_or_path, tokenizer, training_args)
        train_ds, eval_ds, family_sets = family_eval_sets(script_args, train_ds, eval_ds, training_args)
    check_against_data(training_args, train_ds, eval_ds)
    if family_sets and training_args.process_index == 0:
        held, text_only = set(script_args.heldout_family_names()), set(script_args.unlabeled_family_names())
        probe_only = set(script_args.probe_label_family_names())

        def how(f):
            if f in probe_only:
                return ", trained on without labels; its labels fit the probe_distill targets"
            return ", never trained on" if f in held else ", trained on without labels" if f in text_only else ""

        print(
            "families evaluated on their own: "
            + ", ".join(f"{f} ({len(d)} records{how(f)})" for f, d in family_sets.items())
        )
        print(TRANSFER_RULE.format(min_gap=0.05, goal=script_args.transfer_goal))
    resume = resume_target(training_args.resume_from_checkpoint)
    if training_args.use_cpu or not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinned memory needs an accelerator (a warning per loader)
    gap_config = script_args.gap_config(
        loops=parse_loop_counts(script_args.eval_loops, "eval_loops")
        if script_args.eval_loops is not None
        else default_eval_loops(model.config),
        batch_size=training_args.per_device_eval_batch_size,
        seed=training_args.seed,
        verdict_tokens=(training_args.verdict_yes, training_args.verdict_no),
        # the organism's tasks cluster by their (item, a, b) triple: names do not change the arithmetic
        group_by=DIGIT_GROUP_FIELD if script_args.dataset == "organism" else "task",
    )
    replay = None
    if training_args.loss_weights["replay"] > 0:  # the base model's own answers to the training tasks; before the
        # before-evaluation, so a model that cannot answer them (all cut off) fails in seconds, not after it
        with times("replay"):
            replay = replay_records(model, tokenizer, train_ds, script_args, training_args)

    probe_train = None
    if script_args.train_split_probe:  # the stronger yardstick fitted on the labelled training split
        probe_train = labelled_training_records(
            train_ds, training_args.label_fraction, training_args.seed, gap_config.group_by or "task"
        )
    wandb = "wandb" in (training_args.report_to or [])
    out = training_args.output_dir
    before_dir = os.path.join(out, "before")
    if training_args.process_index == 0:  # the records and settings a later eval-gap of final/ reads back
        save_run_inputs(out, eval_ds, probe_train, script_args, training_args, model_args, gap_config)
    # the verdict is taken at the depth the adapters were trained at (default: the model's total_ut_steps)
    compare_config = CompareConfig(loops=training_args.num_loops, rr_tolerance=script_args.rr_tolerance)
    # one block of kept features while the weights are the base's: each family's before-evaluation reads the pooled
    # one's features of its records, and the probe_distill targets (fitted on the base, the fresh adapters off) read
    # the before-evaluation's features of the training records it fitted its yardstick probe on
    with reused_features():
        if training_args.process_index == 0:
            print(compare_config.rule())  # the rule, before any figure
            if resume and os.path.exists(os.path.join(before_dir, "gap.json")):
                # a resumed run: the base model and the held-out records are the same, so is the before-eval
                print(f"resuming: the before-evaluation in {before_dir} is reused")
                before = GapResult.from_json(before_dir)
            else:
                print(
                    f"train {len(train_ds)} / held-out {len(eval_ds)} verification records; evaluating before training"
                )
                with times("before_eval"):
                    before = evaluate_gap(
                        model,
                        tokenizer,
                        eval_ds,
                        config=gap_config,
                        out_dir=before_dir,
                        probe_train_dataset=probe_train,
                    )
                print(short_markdown(before, os.path.join(before_dir, "gap.md")))
            with times("before_eval"):
                families_before = evaluate_families(
                    model, tokenizer, family_sets, gap_config, os.path.join(before_dir, "families"), resume
                )
            with times("before_eval"):
                general_before = (
                    answer_general_questions(model, tokenizer, num_loops=trained_loops(model))
                    if script_args.general_questions
                    else None
                )

        trainer = GapSFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            peft_config=lora_config(model_args, script_args, model.config),
            replay_dataset=replay,
        )

    if training_args.process_index == 0 and HIDDEN_LABEL in train_ds.column_names and trainer.probe_targets_summary:
        check = probe_target_quality(trainer.train_dataset, train_ds, script_args.family_field)
        atomic_write_text(os.path.join(out, "probe_targets_check.json"), json.dumps(check, indent=1))
        print(
            "probe_distill targets of the unlabelled families against their hidden labels (a diagnostic; never "
            "trained on): "
            + ", ".join(
                f"{f} AUROC {100 * c['auroc']:.1f}, Yes taught {100 * c['taught_yes']:.0f}% (n {c['n']})"
                for f, c in check.items()
            )
        )
    use_short_console_log(trainer, trainer.num_loops)  # W&B and the trainer state keep every metric
    with times("train"):
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(os.path.join(out, "final"))
    if trainer.accelerator.is_main_process:
        # the loss history beside the reports (W&B holds it too, when on)
        atomic_write_text(os.path.join(out, "log_history.json"), json.dumps(trainer.state.log_history, indent=1))
        tuned = trainer.accelerator.unwrap_model(trainer.model).eval()
        # each family's after-evaluation reads the pooled one's features of its records, not the model again
        with reused_features(), times("after_eval"):
            # the before-evaluation's probes, frozen, on the tuned features (part c's drift; None: an old before/)
            frozen = load_frozen_probes(before_dir, required=False)
            after_dir = os.path.join(out, "after")
            after = evaluate_gap(
                tuned,
                tokenizer,
                eval_ds,
                config=gap_config,
                out_dir=after_dir,
                frozen_probes=frozen,
                probe_train_dataset=probe_train,
            )
            families_after = (
                evaluate_families(
                    tuned,
                    tokenizer,
                    family_sets,
                    gap_config,
                    os.path.join(out, "after", "families"),
                    frozen_from=os.path.join(before_dir, "families"),
                )
                if family_sets
                else None
            )
        comparison = compare(before, after, compare_config)
        atomic_write_text(os.path.join(out, "compare.md"), comparison.markdown())
        atomic_write_text(os.path.join(out, "compare.json"), comparison.to_json())
        # the run at a glance: TP, SV and RR per loop (a plain LM: per layer), before dashed and after solid
        title = f"{model_args.model_name_or_path}: sft-gap, verdict {comparison.outcome}"
        figure = before_after_figure(before, after, comparison.depth, title=title)
        save_figure(figure, out, "before_after")
        families = None
        if family_sets:
            families = compare_families(
                families_before,
                families_after,
                trained=set(family_sets)
                - set(script_args.heldout_family_names())
                - set(script_args.unlabeled_family_names())
                - set(script_args.probe_label_family_names()),
                unlabeled=set(script_args.unlabeled_family_names()),
                probe_labeled=set(script_args.probe_label_family_names()),
                loop=comparison.loops[0],
                config=compare_config,
                goal=script_args.transfer_goal,
            )
            families.save(out, title=f"{model_args.model_name_or_path}: sft-gap")
        general_after = drift = None
        if general_before is not None:
            with times("after_eval"):
                general_after = answer_general_questions(tuned, tokenizer, num_loops=trained_loops(tuned))
                # the continuous measure beside the ten questions: the base is the tuned model with its adapters off,
                # so a full fine-tune (no base copy kept) has none
                if hasattr(tuned, "disable_adapter"):
                    drift = general_drift(tuned, tokenizer, num_loops=trained_loops(tuned))
                else:
                    logger.info("general drift: not measured (a full fine-tune keeps no copy of the base model)")
            save_general(out, general_before, general_after, drift)
        # how to load it (adapters or, for a full fine-tune, the model), and the verdict
        write_adapter_card(
            os.path.join(out, "final"),
            comparison.markdown(),
            base_model=model_args.model_name_or_path,
            training=training_args.to_dict(),
            dataset=script_args.dataset,
        )
        if wandb:
            import wandb as wb

            after.log_wandb(run=wb.run, prefix="gap_after/")
            before.log_wandb(run=wb.run, prefix="gap_before/")
            log_comparison_wandb(comparison, wb.run)  # dSV, dRR, gap after, TP and the verdict in the summary
            wb.run.log({"compare/before_after": wb.Image(os.path.join(out, "before_after.png"))})
            if families is not None:
                wb.run.log({"compare/families": wb.Image(os.path.join(out, "families.png"))})
            wb.run.config.update({"recipe": dataclasses.asdict(script_args)}, allow_val_change=True)
        print("\nBefore / after gap SFT on the held-out split:\n")
        print(comparison.markdown())
        if families is not None:
            print(families.markdown())
        if general_after is not None:
            print(general_markdown(general_before, general_after, drift))
        print(f"\nReports, plots, adapters and probes are in {out}/")
        print(
            "Re-evaluate the adapters on the same held-out records with the same settings: "
            f"loopalign eval-gap --model_name_or_path {os.path.join(out, 'final')}"
        )
        timings = times.as_dict(world_size=training_args.world_size, device=str(training_args.device),
                                resumed=bool(resume), model=model_args.model_name_or_path)  # fmt: skip
        atomic_write_text(os.path.join(out, "timings.json"), json.dumps(timings, indent=1))
        print(f"phase times (main process): {times.line()}")
    # every rank, when its work is done: its process group is destroyed before the interpreter exits (accelerate's
    # end_training); left to interpreter shutdown, gloo can abort a finished rank ("terminate called without an
    # active exception"), failing a run whose results were written
    trainer.accelerator.end_training()


def cli_model(argv: list[str]) -> str | None:
    """The ``--model_name_or_path`` given on the command line, if any, read as the recipe's parser reads it: either
    spelling (``--model-name-or-path``), ``=`` or a separate value, an abbreviation (``--model_name``), the last one
    given. None when absent or malformed (the recipe's parser then says what is wrong)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=True, exit_on_error=False)
    pre.add_argument("--model_name_or_path", "--model-name-or-path", dest="model")
    try:
        return pre.parse_known_args(argv)[0].model
    except (argparse.ArgumentError, SystemExit):
        return None


def cpu_default_applies(argv: list[str]) -> bool:
    """The shipped CPU default (``loopalign/configs/sft_gap_cpu_default.yaml``) applies without --config, to the
    local models only (or none named): a hub model named on the command line gets TRL's defaults, not the
    organism's learning rate and step count. The model is read the way ``--config`` is: argparse, before the
    full parse (:func:`cli_model`)."""
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        return False
    model = cli_model(argv)
    return model is None or is_local_model(model)


def launched_on_cpu_processes() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without a GPU: each must run
    as a CPU rank of one gloo group, or the Trainer trains independent copies side by side."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_parser(argv: list[str] | None = None):
    """The script's ``TrlParser`` (GapScriptArguments, GapSFTConfig, ModelConfig; YAML with ``--config``); without
    ``--config`` the CPU organism's defaults apply to the local models named in ``argv``."""
    argv = list(argv or [])
    parser = make_parser((GapScriptArguments, GapSFTConfig, ModelConfig), __doc__)
    if cpu_default_applies(argv):
        apply_cpu_default(parser, "sft_gap")
    elif "--help" not in argv and "-h" not in argv and "--config" not in argv:
        print(
            f"sft_gap: {cli_model(argv)} without --config: TRL's defaults apply (not the CPU organism's); "
            "recipes/configs/ has tuned configs for Ouro-1.4B"
        )
    if launched_on_cpu_processes():
        parser.set_defaults(use_cpu=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``recipes/sft_gap.py`` / ``loopalign sft-gap``: parse ``argv`` (default ``sys.argv[1:]``), train, compare."""
    command_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = parse_or_exit(build_parser(argv), argv)
    train_and_compare(script_args, training_args, model_args)
    return 0
