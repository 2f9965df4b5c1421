"""SV / RR / gap (and TP) per loop for any model and dataset (the body is loopalign.scripts.eval_gap;
`loopalign eval-gap` runs the same code).

    python recipes/eval_gap.py                                   # the model organism, its held-out tasks
    python recipes/eval_gap.py --model_name_or_path tiny --eval_loops 1-8 --output_dir outputs/eval_tiny
    python recipes/eval_gap.py --model_name_or_path ByteDance/Ouro-1.4B --dataset builds/math --eval_loops 1-8
    python recipes/eval_gap.py --model_name_or_path RUN/final --dataset DIR --compare RUN/before
    python recipes/eval_gap.py --config my_eval.yaml            # YAML, command-line options override it
"""

import sys

from loopalign.scripts.eval_gap import main

if __name__ == "__main__":
    sys.exit(main())
