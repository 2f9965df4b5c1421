"""Data builders for loopalign: the command-line builders of verification sets (math, safety) and
concept-injection data.

- ``python -m data_builders.verification`` (also ``loopalign build-data``): verification datasets.
- ``python -m data_builders.injection``: concept vectors per (loop, layer) and injection trials.

The library code lives in :mod:`loopalign.data` (schema, sources, verifiers, candidates, prompts, io,
verification) and :mod:`loopalign.injection`; ``data_builders.<module>`` names stay importable for one release
(they are the same modules). This package imports nothing itself, so that ``python -m`` entry points run
cleanly. See ``data_builders/README.md``.
"""
