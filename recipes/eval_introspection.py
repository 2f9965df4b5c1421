"""Concept-injection introspection eval (Lindsey et al. protocol, per loop) of a looped model.

    python recipes/eval_introspection.py                                     # CPU default model, about a minute
    python recipes/eval_introspection.py --config recipes/configs/eval_introspection_ouro_1.4b.yaml

The body lives in :mod:`loopalign.scripts.eval_introspection` (``loopalign eval-introspection`` runs the same).
"""

import sys

from loopalign.scripts.eval_introspection import main

if __name__ == "__main__":
    sys.exit(main())
