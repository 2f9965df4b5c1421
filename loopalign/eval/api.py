"""``evaluate_gap``: SV, RR, their gap and (optionally) TP per loop, in one call."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from loopalign.batching import pad_token_id
from loopalign.data.load import statements_only
from loopalign.data.sources.statements import statement_tasks
from loopalign.data.verifiers import verify_name
from loopalign.errors import ConfigError
from loopalign.io import folder_lock
from loopalign.models.contract import trained_loops
from loopalign.probes import LinearProbe, save_probes

from .controls import evaluate_controls, record_authors
from .features import FeatureConfig, extract_features, prepare_records
from .gap import GapResult, gap_table, metric_value, parse_loops
from .metrics import METRICS, label_balance
from .readout import (
    ReadoutConfig,
    apply_frozen_probes,
    calibrate_scores,
    fit_all_sites_readout,
    fit_readout,
    fit_train_split_readout,
    frozen_probes,
    load_frozen_probes,
    resolve_select_by,
)
from .task import TaskConfig, task_performance
from .verbal import sampled_verdicts, sv_metrics, sv_predictions, verdict_token_ids

logger = logging.getLogger(__name__)

__all__ = [
    "GapConfig",
    "UnbalancedLabelsWarning",
    "evaluate_gap",
    "resolve_metric",
]


@dataclass
class GapConfig:
    """What ``evaluate_gap`` measures and how."""

    loops: str | list[int] = "1-4"  # loop counts, e.g. "1-8", "1,2,4" or [1, 2]; may exceed total_ut_steps
    metric: str = "auto"  # headline: "auto" (resolve_metric), "accuracy", "balanced_accuracy", "f1", "auroc"
    min_minority_share: float = 0.4  # labels are unbalanced when the minority class is below this share (loud warning)
    sv_decision: str = "forced"  # "forced": P(yes) > P(no); "strict": the full-vocab argmax must be the right token
    verdict_tokens: tuple[str | int, str | int] = ("Yes", "No")  # yes/no verdicts: single-token strings or ids
    group_by: str | None = "task"  # record field: groups for probe splits and bootstrap clusters (None: each alone)
    n_boot: int = 1000  # bootstrap resamples for CIs
    alpha: float = 0.05  # 1 - CI level
    seed: int = 0  # bootstrap seed
    features: FeatureConfig = field(default_factory=FeatureConfig)  # extraction (batch size, layers)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)  # probes (L2 grid, splits)
    task: TaskConfig | None = None  # TP settings; None skips TP
    tp_loops: str | list[int] | None = None  # loop counts for TP (None: the same loops)
    sampled_verdict: bool = False  # also generate verdict text per loop (unparseable counted separately)
    sampled_max_new_tokens: int = 4  # tokens generated for a sampled verdict
    controls: bool = True  # shortcut controls: question-only, author and noise probes (loopalign.eval.controls)
    author_field: str | None = "auto"  # record field naming the answer's author ("auto": author, source_model,
    # model, policy, at the top level or in `meta`); None: no author control
    compile_layers: bool = False  # torch.compile the layers for feature extraction (sets features.compile_layers)
    all_sites_probe: bool = True  # also a stronger yardstick beside RR: one probe per loop over every extracted
    # layer x probe position, on RR's splits (table: rr_all_sites, rr_all_sites_auroc; records: rr_all_prob)
    train_split_records: int = 512  # with evaluate_gap(probe_train_dataset=...): the training records the
    # train-split probe is fitted on, whole clusters drawn with `seed` up to this many (0: all of them)

    def __post_init__(self):
        self.loops = parse_loops(self.loops, "GapConfig.loops")
        if self.compile_layers:
            self.features.compile_layers = True
        if self.tp_loops is not None:
            self.tp_loops = parse_loops(self.tp_loops, "GapConfig.tp_loops")
        if self.metric != "auto" and self.metric not in METRICS:
            raise ConfigError(f"GapConfig.metric must be 'auto' or one of {list(METRICS)}, got {self.metric!r}")
        if not 0 <= self.min_minority_share <= 0.5:
            raise ConfigError(f"GapConfig.min_minority_share must be in [0, 0.5], got {self.min_minority_share}")
        if self.sv_decision not in ("forced", "strict"):
            raise ConfigError(f"GapConfig.sv_decision must be 'forced' or 'strict', got {self.sv_decision!r}")
        if len(self.verdict_tokens) != 2:
            raise ConfigError(f"GapConfig.verdict_tokens must be (yes, no), got {self.verdict_tokens!r}")
        if self.n_boot < 10:
            raise ConfigError(f"GapConfig.n_boot must be >= 10, got {self.n_boot}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"GapConfig.alpha must be in (0, 1), got {self.alpha}")
        if self.train_split_records < 0:
            raise ConfigError(f"GapConfig.train_split_records must be >= 0 (0: all), got {self.train_split_records}")
        if self.sampled_max_new_tokens < 1:
            raise ConfigError(f"GapConfig.sampled_max_new_tokens must be >= 1, got {self.sampled_max_new_tokens}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"]["feature_dtype"] = str(self.features.feature_dtype)
        d["readout"]["fit"]["dtype"] = str(self.readout.fit.dtype)
        return d


class UnbalancedLabelsWarning(UserWarning):
    """The evaluation labels are unbalanced: accuracy can manufacture or hide a gap."""


def resolve_metric(metric: str, minority_share: float, min_minority_share: float = 0.4) -> tuple[str, str]:
    """The headline metric and the rule that chose it.

    ``"auto"``: accuracy when the evaluation labels are balanced (minority class share >=
    ``min_minority_share``), else balanced accuracy, which a constant or label-prior predictor cannot
    push above 0.5. Any other metric is used as asked. -> (metric, rule in words).
    """
    unbalanced = bool(minority_share < min_minority_share)
    if metric != "auto":
        return metric, f"{metric} (as configured)"
    if unbalanced:
        return "balanced_accuracy", (
            f"balanced_accuracy (metric='auto': minority share {minority_share:.3f} < {min_minority_share:g})"
        )
    return "accuracy", f"accuracy (metric='auto': minority share {minority_share:.3f} >= {min_minority_share:g})"


def _tp_tasks(dataset, verifier) -> tuple[list[tuple[str, str, str]], Callable | None]:
    """TP's (task id, task, gold) and verifier for ``dataset``. Statements (``statements_only``) ask each entity's
    question (``statement_tasks``: "What is the capital of France?", gold "Paris"), scored by ``verify_name`` unless
    ``verifier`` is given; records without a question (numeric, your own table's) are counted in the log. Other
    records: their own task and gold, one per task, with ``verifier`` (None: the task module's default)."""
    if statements_only(dataset):
        tasks, without = statement_tasks(dataset)
        if without:
            logger.info(
                "TP: statements without a question, not in TP: %s",
                ", ".join(f"{family} {n} records" for family, n in without.items()),
            )
        return tasks, verifier or verify_name
    return _tasks(dataset), verifier


def _tasks(dataset) -> list[tuple[str, str, str]]:
    seen, tasks = set(), []
    for i, row in enumerate(dataset):
        task, gold = row.get("task"), row.get("gold")
        if not task or gold in (None, ""):
            raise ValueError(f"record {row.get('id', f'#{i}')!r}: needs fields 'task' and 'gold' for TP")
        if task not in seen:
            seen.add(task)
            tasks.append((str(row.get("id", f"#{i}")), str(task), str(gold)))
    return tasks


def evaluate_gap(
    model,
    tokenizer,
    dataset,
    loops: str | list[int] | None = None,
    config: GapConfig | None = None,
    verifier: Callable[[str, str], bool | None] | None = None,
    out_dir: str | None = None,
    wandb: bool = False,
    wandb_kwargs: dict | None = None,
    frozen_probes: str | dict[str, LinearProbe] | None = None,
    probe_train_dataset=None,
) -> GapResult:
    """SV and RR per loop (one forward per batch serves every loop), the gap table with bootstrap
    CIs, and TP when ``config.task`` is set. With ``out_dir``: gap.json, gap.md, plots and
    probes.safetensors/json are written there. ``loops`` overrides ``config.loops``.

    ``out_dir`` is locked (:func:`loopalign.io.folder_lock`) from the start of the evaluation to the
    last file: while another evaluation writes there, this one fails at once with
    ``FolderLockedError`` naming the folder and that run (pid, host), before any model work.

    ``frozen_probes``: the per-fold RR probes of an earlier evaluation (its ``out_dir``, its probes path, or
    the probes: :func:`loopalign.eval.readout.load_frozen_probes`), typically the base model's "before";
    they are applied unchanged to this model's features, each record scored by the probe that held it
    out, and the posteriors land in ``records['rr_frozen_prob']`` [T][N] for the frozen half of
    :func:`loopalign.eval.compare`'s part (c). Checked before any model work.

    ``probe_train_dataset``: labelled records the evaluation never scores (the fine-tune's training split), in
    the dataset's format: a stronger yardstick beside RR, a probe fitted on them through this model
    (:func:`loopalign.eval.readout.fit_train_split_readout`; ``config.train_split_records`` of them) and applied
    to every evaluated record: ``rr_train_split`` / ``rr_train_split_auroc`` in the table,
    ``records['rr_train_prob']``. Its records are checked (labels, no id shared with ``dataset``) before any
    model work.
    """
    if frozen_probes is not None:
        frozen_probes = _frozen(frozen_probes)
    train_records = None
    if probe_train_dataset is not None:
        train_records = _train_split_records(probe_train_dataset, dataset, tokenizer, config or GapConfig())
    args = (model, tokenizer, dataset, loops, config, verifier, out_dir, wandb, wandb_kwargs, frozen_probes)
    args += (train_records,)
    if out_dir is None:
        return _evaluate_gap(*args)
    with folder_lock(out_dir, "evaluate_gap"):
        return _evaluate_gap(*args)


def _train_split_records(train, dataset, tokenizer, config: GapConfig) -> list:
    """The train-split probe's records, validated (labelled, disjoint from ``dataset``) and drawn: whole clusters
    in a seeded order until ``config.train_split_records`` records (0: all)."""
    records = prepare_records(train, tokenizer=tokenizer, require_label=True, group_by=config.group_by)
    evaluated = {str(row["id"]) for row in dataset if row.get("id") is not None}  # records without an id: unchecked
    shared = [str(row["id"]) for row in train if row.get("id") is not None and str(row["id"]) in evaluated]
    if shared:
        raise ValueError(
            f"probe_train_dataset: record {shared[0]!r} (and {len(shared) - 1} more) is also in the evaluated "
            "dataset: the train-split probe must be fitted on records the evaluation never scores"
        )
    if config.train_split_records and len(records) > config.train_split_records:
        by_group: dict[str, list] = {}
        for r in records:
            by_group.setdefault(r.group, []).append(r)
        order = list(by_group)
        np.random.default_rng(config.seed).shuffle(order)
        kept = []
        for g in order:
            if len(kept) >= config.train_split_records:
                break
            kept += by_group[g]
        records = kept
    if len({r.label for r in records}) < 2:
        raise ValueError(f"probe_train_dataset: its {len(records)} drawn records hold a single class")
    return records


def _frozen(probes) -> dict[str, LinearProbe]:
    if isinstance(probes, (str, os.PathLike)):
        return load_frozen_probes(os.fspath(probes))
    if isinstance(probes, dict):
        return frozen_probes(probes)
    raise TypeError(f"evaluate_gap: frozen_probes must be a path or a dict of probes, got {type(probes).__name__}")


def _evaluate_gap(
    model, tokenizer, dataset, loops, config, verifier, out_dir, wandb, wandb_kwargs, frozen=None, train_records=None
) -> GapResult:
    config = config or GapConfig()
    if loops is not None:
        config.loops = parse_loops(loops)
    start = time.perf_counter()
    records = prepare_records(dataset, tokenizer=tokenizer, require_label=True, group_by=config.group_by)
    verdict_ids = verdict_token_ids(tokenizer, *config.verdict_tokens)
    pad_id = pad_token_id(tokenizer)
    feats = extract_features(model, records, config.loops, verdict_ids, config.features, pad_id=pad_id)
    t_feat = time.perf_counter() - start
    labels = feats.labels
    # the headline metric is fixed before the probes are fitted: their L2 and layer are selected by it
    metric, metric_rule = resolve_metric(
        config.metric, label_balance(labels)["minority_share"], config.min_minority_share
    )
    readout_config = resolve_select_by(config.readout, metric)
    readout = fit_readout(feats, readout_config, metric)
    rr_frozen = apply_frozen_probes(feats, frozen) if frozen is not None else None
    rr_all = fit_all_sites_readout(feats, readout.splits, readout_config) if config.all_sites_probe else None
    rr_train, train_probes = None, None
    if train_records is not None:
        train_feats = extract_features(model, train_records, config.loops, verdict_ids, config.features, pad_id=pad_id)
        rr_train, train_probes = fit_train_split_readout(train_feats, feats, readout_config)
        del train_feats
    t_probe = time.perf_counter() - start - t_feat
    ev = readout.eval_index
    sv_prob, sv_pred = sv_predictions(feats, config.sv_decision)
    # SV with a label-fitted threshold: a cut on its log-odds fitted on RR's train splits, scored out of fold
    sv_logodds = (feats.verdict_logp[..., 0] - feats.verdict_logp[..., 1]).double().numpy()
    sv_cal_prob = calibrate_scores(sv_logodds, labels, readout.splits, readout_config)
    balance = label_balance(labels[ev])
    unbalanced = bool(balance["minority_share"] < config.min_minority_share)
    notes = []
    if unbalanced:
        notes.append(
            f"UNBALANCED LABELS: {100 * balance['positive_share']:.1f}% of the {balance['n']} evaluated records "
            f"are label 1 (minority share {balance['minority_share']:.3f} < {config.min_minority_share:g}); "
            f"accuracy can manufacture or hide a gap here. Headline metric: {metric_rule}; read balanced "
            "accuracy and AUROC."
        )
        warnings.warn(notes[-1], UnbalancedLabelsWarning, stacklevel=2)
    groups = [g if config.group_by and g != rid and g != "" else None for g, rid in zip(feats.groups, feats.ids)]
    ev_groups = [groups[i] for i in ev]
    n_without = sum(g is None for g in ev_groups)
    n_clusters = len({g for g in ev_groups if g is not None}) + n_without
    table = gap_table(
        labels[ev],
        sv_prob[:, ev],
        sv_pred[:, ev],
        readout.prob[:, ev],
        feats.loops,
        metric=metric,
        n_boot=config.n_boot,
        alpha=config.alpha,
        seed=config.seed,
        sv_cal_prob=sv_cal_prob[:, ev],
        clusters=ev_groups,
    )
    rr_rows = readout.metrics(labels)
    rr_fixed_rows = readout.metrics(labels, fixed=True)
    sv_all = sv_metrics(feats, decision=config.sv_decision)
    for ti, (row, rr, sv) in enumerate(zip(table, rr_rows, sv_all)):
        fixed = readout.fixed_prob[ti, ev]
        row["rr_fixed"] = metric_value(metric, labels[ev], fixed, (fixed > 0.5).astype(np.int64))
        row["sv_valid_rate"] = sv["valid_rate"]
        row["best_layer"] = ",".join(map(str, rr["best_layer"]))
        for column, posteriors in (("rr_all_sites", rr_all), ("rr_train_split", rr_train)):  # the yardsticks
            if posteriors is not None:
                scored = posteriors[ti, ev]
                decided = (scored > 0.5).astype(np.int64)
                row[column] = metric_value(metric, labels[ev], scored, decided)
                row[f"{column}_auroc"] = metric_value("auroc", labels[ev], scored, decided)
    controls, control_probs, t_controls = None, {}, 0.0
    if config.controls:
        t0 = time.perf_counter()
        author_field, authors = record_authors(dataset, config.author_field)
        controls, control_probs = evaluate_controls(
            feats, readout, groups, readout_config, metric, authors, author_field or config.author_field, config.seed
        )
        t_controls = time.perf_counter() - t0
    tp = None
    if config.task is not None:
        sources = sorted({str(row.get("source") or "") for row in dataset} - {""})
        tasks, tp_verifier = _tp_tasks(dataset, verifier)
        if tasks:
            tp = task_performance(
                model, tokenizer, tasks, config.tp_loops or config.loops, tp_verifier, config.task, sources=sources
            )
        else:
            logger.info("TP: not measured (no record has a question for the model to answer)")
    sampled = None
    if config.sampled_verdict:
        sampled = sampled_verdicts(
            model,
            tokenizer,
            records,
            config.loops,
            max_new_tokens=config.sampled_max_new_tokens,
            batch_size=config.features.batch_size,
        )
    eval_mask = np.zeros(len(labels), dtype=bool)
    eval_mask[ev] = True
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    result = GapResult(
        loops=feats.loops,
        metric=metric,
        table=table,
        sv=sv_all,
        sv_eval=sv_metrics(feats, subset=ev, decision=config.sv_decision),
        rr=rr_rows,
        rr_fixed=rr_fixed_rows,
        heatmap={
            "layers": readout.layer_names,
            "test": readout.heatmap_test.tolist(),
            "val": readout.heatmap_val.tolist(),
        },
        records={
            "ids": feats.ids,
            "labels": labels.tolist(),
            "eval": eval_mask.tolist(),
            "sv_prob": sv_prob.tolist(),
            "sv_pred": sv_pred.tolist(),
            "rr_prob": readout.prob.tolist(),
            "sv_cal_prob": sv_cal_prob.tolist(),
            "clusters": groups,
            "exit_probs": feats.exit_probs.tolist(),
            **{f"control_{k}_prob": v.tolist() for k, v in control_probs.items() if v is not None},
            **({"rr_frozen_prob": rr_frozen.tolist()} if rr_frozen is not None else {}),
            **({"rr_all_prob": rr_all.tolist()} if rr_all is not None else {}),
            **({"rr_train_prob": rr_train.tolist()} if rr_train is not None else {}),
        },
        tp=tp,
        sv_sampled=sampled,
        config=config.to_dict(),
        meta={
            "model": str(name),
            "n_records": len(records),
            "n_eval": int(len(ev)),
            "verdict_ids": list(verdict_ids),
            "fixed_layer": readout.layer_names[readout.layers.index(readout.fixed_layer)],
            "seconds_features": round(t_feat, 3),
            "seconds_probes": round(t_probe, 3),
            "seconds_controls": round(t_controls, 3),
            "seconds_total": round(time.perf_counter() - start, 3),
            "device": str(next(model.parameters()).device),
            "total_ut_steps": trained_loops(model),
            "metric_rule": metric_rule,
            "select_by": readout_config.select_by,
            "frozen_readout": None if frozen is None else {"n_probes": len(frozen)},
            "all_sites_readout": None
            if rr_all is None
            else {"layers": readout.layer_names, "n_sites": len(feats.layers) * int(feats.states.shape[3])},
            "train_split_readout": None
            if rr_train is None
            else {"n_train": len(train_records), "per_loop": train_probes},
            "label_balance": dict(balance, min_minority_share=config.min_minority_share, unbalanced=unbalanced),
            "clusters": {
                "field": config.group_by,
                "n_clusters": int(n_clusters),
                "n_records": int(len(ev)),
                "n_without_task": int(n_without),
            },
            "warnings": notes,
        },
        controls=controls,
    )
    if out_dir is not None:
        result.save(out_dir)
        save_probes({**readout.probes, **readout.fold_probes}, f"{out_dir}/probes")
    if wandb:
        result.log_wandb(**(wandb_kwargs or {}))
    del feats
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
