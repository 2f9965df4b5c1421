"""Per-loop loss, answer accuracy and exit probability of a looped model before and after a short per-loop run
(the body is loopalign.scripts.ouro_loops; `loopalign ouro-loops` runs the same code).

    python recipes/ouro_loops.py                          # tiny Ouro + local tokenizer, ~1 min on 2 CPU cores
    python recipes/ouro_loops.py --model_name_or_path ByteDance/Ouro-1.4B --max_steps 0 --eval_loops 1-8
"""

import sys

from loopalign.scripts.ouro_loops import main

if __name__ == "__main__":
    sys.exit(main())
