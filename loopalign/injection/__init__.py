"""Concept injection primitives: word lists, concept vectors, trial prompts and per-row injection.

The floor that evaluation (:mod:`loopalign.eval.introspection`), the trainers
(:mod:`loopalign.trainers.introspection`), the rewards and the recipes stand on; it imports none of them.

    from loopalign.injection import CONCEPT_WORDS, extract_concept_vectors, trial_prompt, inject_rows
"""

from .prompts import (
    RESEARCHER_PROMPT,
    STRUCTURED_QUESTION,
    TRIAL_PROMPT,
    TRIAL_QUESTION,
    concept_prompt_ids,
    render_chat,
    transcript_prompt,
    trial_prompt,
)
from .rows import TRIAL_TYPES, inject_rows, injection_spec, residual_site_norms, trial_vector, trial_vectors
from .vectors import (
    FORMAT_VERSION,
    ConceptVectors,
    concept_vectors_for,
    default_vector_layer,
    extract_concept_vectors,
    load_concept_vectors,
    load_vectors,
    save_concept_vectors,
    vector_norms,
    vectors_hash,
)
from .words import BASELINE_WORDS, CONCEPT_TEMPLATE, CONCEPT_WORDS

__all__ = [
    "BASELINE_WORDS",
    "CONCEPT_TEMPLATE",
    "CONCEPT_WORDS",
    "FORMAT_VERSION",
    "RESEARCHER_PROMPT",
    "TRIAL_PROMPT",
    "STRUCTURED_QUESTION",
    "TRIAL_QUESTION",
    "TRIAL_TYPES",
    "ConceptVectors",
    "concept_prompt_ids",
    "concept_vectors_for",
    "default_vector_layer",
    "extract_concept_vectors",
    "inject_rows",
    "injection_spec",
    "load_concept_vectors",
    "load_vectors",
    "render_chat",
    "residual_site_norms",
    "save_concept_vectors",
    "transcript_prompt",
    "trial_prompt",
    "trial_vector",
    "trial_vectors",
    "vector_norms",
    "vectors_hash",
]
