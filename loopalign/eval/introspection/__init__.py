"""Concept-injection introspection after Lindsey et al. 2025, per loop of a looped model.

- :mod:`.grading`: rules grader and judges' interface (:class:`Grade`);
- :mod:`.judges`: a model judge read beside the rules;
- :mod:`.trials`: the protocol's config, the trial grid, generation with injection, the evaluation;
- :mod:`.stats`: rates with Wilson intervals, per cell / per loop / per layer;
- :mod:`.report`: markdown, heatmaps and curves, before/after.

Injection primitives (concept vectors, prompts, per-row injection) live in :mod:`loopalign.injection`;
the names this package exported before the split are re-exported here.
"""

# moved to loopalign.injection; re-exported for one release
from loopalign.injection import (
    TRIAL_TYPES,
    inject_rows,
    residual_site_norms,
    transcript_prompt,
    trial_vector,
    trial_vectors,
)

from .grading import (
    RELATED,
    Grade,
    Judge,
    concept_forms,
    detection_claim,
    grade_response,
    is_incoherent,
    named_concepts,
    rules_grade,
    structured_grade,
)
from .report import IntrospectionResult, compare_introspection
from .stats import (
    RESULT_RULE,
    SPECIFICITY_RULE,
    naming_rate,
    positive_control_verdict,
    specificity_verdict,
    summarize,
)
from .trials import (
    CONTROL_QUESTIONS,
    IntrospectionConfig,
    build_eval_trials,
    check_loop_counts,
    evaluate_introspection,
    generate_responses,
    parse_indices,
    resolve_loop_words,
    split_concepts,
)

__all__ = [
    "CONTROL_QUESTIONS",
    "RELATED",
    "TRIAL_TYPES",
    "Grade",
    "rules_grade",
    "structured_grade",
    "grade_response",
    "concept_forms",
    "detection_claim",
    "named_concepts",
    "is_incoherent",
    "transcript_prompt",
    "IntrospectionConfig",
    "build_eval_trials",
    "check_loop_counts",
    "trial_vector",
    "trial_vectors",
    "residual_site_norms",
    "inject_rows",
    "generate_responses",
    "parse_indices",
    "resolve_loop_words",
    "split_concepts",
    "summarize",
    "RESULT_RULE",
    "positive_control_verdict",
    "specificity_verdict",
    "SPECIFICITY_RULE",
    "naming_rate",
    "IntrospectionResult",
    "evaluate_introspection",
    "compare_introspection",
    "Judge",
]
