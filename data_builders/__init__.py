"""Data builders for loopalign: verification sets (math, safety) and concept-injection data.

Modules (import them directly; this package imports nothing so that ``python -m`` entry points run cleanly):

- :mod:`data_builders.schema`: record schemas and validation (:class:`~data_builders.schema.RecordError`).
- :mod:`data_builders.sources`: GSM8K, GSM8K model solutions, MATH, safety (BeaverTails / PKU-SafeRLHF
  field maps, XSTest prompts and completions) and synthetic arithmetic problems.
- :mod:`data_builders.verifiers`: answer extraction / normalisation, math and safety verdicts.
- :mod:`data_builders.candidates`: controlled wrong answers, policy sampling, balancing, de-duplication.
- :mod:`data_builders.prompts`: verification prompts with token indices (verdict, answer end, probes).
- :mod:`data_builders.injection`: concept words, concept vectors per (loop, layer), trial records; CLI.
- :mod:`data_builders.io`: JSONL, content hashes, atomic build folders (``save_build`` / ``load_build``).
- :mod:`data_builders.verification`: the verification-set CLI.

See ``data_builders/README.md``.
"""
