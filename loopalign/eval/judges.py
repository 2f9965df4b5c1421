"""Judges for introspection responses: moved to :mod:`loopalign.eval.introspection.judges`."""

# moved to loopalign.eval.introspection.judges; re-exported for one release
from .introspection.judges import CONCEPT_QUESTION, DETECTION_QUESTION, grader_agreement, model_judge

__all__ = ["model_judge", "grader_agreement", "DETECTION_QUESTION", "CONCEPT_QUESTION"]
