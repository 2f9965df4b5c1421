"""Concept-injection data after Lindsey et al. 2025: the trial build and its CLI.

Word lists, concept vectors, their extraction, the trial prompt and the trial build live in
:mod:`loopalign.injection` (re-exported here); this module is the build command under its older name, the same as
``loopalign build-injection`` (:mod:`loopalign.scripts.build_injection`).

Concept vector of a word at site (t, l): the residual stream after decoder layer ``l`` in loop ``t``
at the last token of the chat-formatted user turn ``Tell me about {word}`` (word lower-cased, with
the generation prompt, so the last token is where the assistant turn begins), minus the mean of
the same activation over the baseline words. Stored per word as a [T, L, H] tensor (T = loops run,
L = the layers extracted, in ``metadata["layers"]`` order).

Word lists are the published ones: 50 concept words and 100 baseline words. The published
baseline list has "Butterflies" twice; we keep it as published (100 entries), so that word counts
twice in the baseline mean (``unique_baseline=True`` drops the repeat).

A trial record is the introspection transcript (user: the researcher text; assistant: "Ok.";
user: "Ok, let's get started.\\n\\nTrial 1: ..."; then the generation prompt) with the site, the
strength and ``injection_start`` = the token index of the double newline before "Trial 1"
(injection runs from there to the end, generated tokens included). Controls have
``injected=False``, ``trial_type="control"``, strength 0 and loop/layer -1.
"""

from __future__ import annotations

from loopalign.injection import (
    BASELINE_WORDS,
    CONCEPT_TEMPLATE,
    CONCEPT_WORDS,
    RESEARCHER_PROMPT,
    TRIAL_PROMPT,
    ConceptVectors,
    concept_prompt_ids,
    extract_concept_vectors,
    load_concept_vectors,
    save_concept_vectors,
    trial_prompt,
    vectors_hash,
)
from loopalign.injection.builds import VECTORS_FILE, check_vectors, rebuild_command
from loopalign.injection.trials import (
    TrialConfig,
    build_injection,
    build_trials,
    check_injection_options,
    load_injection,
)
from loopalign.scripts.build_injection import main as _build_injection_main

__all__ = [
    "CONCEPT_WORDS",
    "BASELINE_WORDS",
    "CONCEPT_TEMPLATE",
    "RESEARCHER_PROMPT",
    "TRIAL_PROMPT",
    "concept_prompt_ids",
    "ConceptVectors",
    "extract_concept_vectors",
    "save_concept_vectors",
    "vectors_hash",
    "load_concept_vectors",
    "trial_prompt",
    "TrialConfig",
    "build_trials",
    "build_injection",
    "check_injection_options",
    "check_vectors",
    "load_injection",
    "rebuild_command",
    "VECTORS_FILE",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m data_builders.injection --model tiny --loops 4 --layers 1 --out DIR`` (= ``loopalign
    build-injection``)."""
    return _build_injection_main(argv, prog="python -m data_builders.injection")


if __name__ == "__main__":
    raise SystemExit(main())
