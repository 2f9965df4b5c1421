"""Ablate the gap-SFT objective on the model organism: variants x seeds, one table and one plot (the body is
loopalign.scripts.ablate_gap; `loopalign ablate-gap` runs the same code).

    python recipes/ablate_gap.py                                  # every variant, seeds 0 1 2, 2 runs at a time
    python recipes/ablate_gap.py --variants lm probe_distill --seeds 0 1 2 3 4
    python recipes/ablate_gap.py --output_dir outputs/ablate_gap -- --max_steps 300   # after --: to every run
"""

import sys

from loopalign.scripts.ablate_gap import main

if __name__ == "__main__":
    sys.exit(main())
