"""Data builders for loopalign: the command-line builders of verification sets (math, safety) and
concept-injection data.

- ``python -m data_builders.verification`` (also ``loopalign build-data``): verification datasets.
- ``python -m data_builders.injection``: concept vectors per (loop, layer) and injection trials.

The library code lives in :mod:`loopalign.data` (schema, sources, verifiers, candidates, prompts, io,
verification, statements) and :mod:`loopalign.injection`; this package holds only the command modules
(``verification``, ``statements``: the same modules as loopalign.data's; ``injection``: the trial build). It
imports nothing itself, so that ``python -m`` entry points run cleanly. See ``data_builders/README.md``.
"""
