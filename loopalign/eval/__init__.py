"""Evaluators per loop: SV (self-verification), RR (representation readout), the gap RR - SV, and TP.

    from loopalign.eval import GapConfig, evaluate_gap, compare
    result = evaluate_gap(model, tokenizer, dataset, loops="1-8", out_dir="out/before")
    print(result.markdown())
    print(compare(before, after).verdict)

Probes live in :mod:`loopalign.probes`.
"""

from loopalign.probes import LinearProbe, ProbeFitConfig, fit_probes, load_probes, save_probes

from .api import (
    GapConfig,
    UnbalancedLabelsWarning,
    evaluate_gap,
    resolve_metric,
)
from .controls import evaluate_controls, record_authors
from .features import FeatureConfig, Features, extract_features, prepare_records
from .gap import TABLE_METRICS, GapResult, gap_table, parse_loops
from .introspection import (
    Grade,
    IntrospectionConfig,
    IntrospectionResult,
    compare_introspection,
    evaluate_introspection,
    grade_response,
    rules_grade,
)
from .metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    binary_metrics,
    bootstrap_ci,
    cluster_members,
    cluster_resample,
    expected_calibration_error,
    f1_score,
    label_balance,
)
from .readout import (
    ReadoutConfig,
    ReadoutResult,
    apply_frozen_probes,
    calibrate_scores,
    fit_readout,
    load_frozen_probes,
    make_splits,
)
from .report import log_comparison_wandb, log_wandb, plot_gap, save_gap
from .task import TaskConfig, generate_texts, integer_verifier, task_performance
from .verbal import parse_verdict, sampled_verdicts, sv_metrics, verdict_token_ids
from .verdict import VERDICT_RULE, CompareConfig, Comparison, compare, trained_depth

__all__ = [
    "TABLE_METRICS",
    "VERDICT_RULE",
    "UnbalancedLabelsWarning",
    "calibrate_scores",
    "cluster_members",
    "cluster_resample",
    "label_balance",
    "resolve_metric",
    "trained_depth",
    "CompareConfig",
    "Comparison",
    "FeatureConfig",
    "Features",
    "GapConfig",
    "GapResult",
    "LinearProbe",
    "ProbeFitConfig",
    "ReadoutConfig",
    "ReadoutResult",
    "TaskConfig",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "binary_metrics",
    "bootstrap_ci",
    "compare",
    "evaluate_controls",
    "evaluate_gap",
    "expected_calibration_error",
    "extract_features",
    "f1_score",
    "fit_probes",
    "fit_readout",
    "apply_frozen_probes",
    "load_frozen_probes",
    "gap_table",
    "generate_texts",
    "integer_verifier",
    "load_probes",
    "log_wandb",
    "log_comparison_wandb",
    "make_splits",
    "parse_loops",
    "parse_verdict",
    "plot_gap",
    "prepare_records",
    "record_authors",
    "sampled_verdicts",
    "save_gap",
    "save_probes",
    "sv_metrics",
    "task_performance",
    "verdict_token_ids",
]


__all__ += [
    "Grade",
    "IntrospectionConfig",
    "IntrospectionResult",
    "compare_introspection",
    "evaluate_introspection",
    "grade_response",
    "rules_grade",
]
