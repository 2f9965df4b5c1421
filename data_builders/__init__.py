"""Data builders for loopalign: the command-line builders of verification sets (math, safety) and
concept-injection data.

- ``python -m data_builders.verification`` (also ``loopalign build-data``): verification datasets.
- ``python -m data_builders.statements`` (also ``loopalign build-statements``): true/false statements.
- ``python -m data_builders.injection`` (also ``loopalign build-injection``): concept vectors per (loop, layer) and
  injection trials.

The library code lives in :mod:`loopalign.data` (schema, sources, verifiers, candidates, prompts, io,
verification, statements) and :mod:`loopalign.injection`, the commands' parsing and ``main`` in
:mod:`loopalign.scripts` (``build_data``, ``build_statements``, ``build_injection``); this package holds only the
commands under their older names (``verification``, ``statements``: the names of loopalign.data's modules read
through them; ``injection``: the trial build's names re-exported). It imports nothing itself, so that
``python -m`` entry points run cleanly. See ``data_builders/README.md``.
"""
