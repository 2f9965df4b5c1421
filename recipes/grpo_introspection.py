"""Introspection RL: GRPO (or SFT) with concept injection inside the rollouts, evaluated before and after.

    python recipes/grpo_introspection.py                                     # CPU default model, minutes
    python recipes/grpo_introspection.py --config recipes/configs/grpo_introspection_ouro_1.4b.yaml
    accelerate launch recipes/grpo_introspection.py --config ...             # multi-GPU

The body lives in :mod:`loopalign.scripts.grpo_introspection` (``loopalign grpo-introspection`` runs the same).
"""

import sys

from loopalign.scripts.grpo_introspection import main

if __name__ == "__main__":
    sys.exit(main())
