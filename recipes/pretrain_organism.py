"""Build the model organism (a tiny Ouro that shows the SV/RR gap) into the cache, or reuse it, and print its
card (the body is loopalign.scripts.pretrain_organism; `loopalign organism` runs the same code).

    python recipes/pretrain_organism.py                   # build into the cache (or reuse it)
    python recipes/pretrain_organism.py --force           # rebuild the cached organism
    python recipes/pretrain_organism.py --output_dir DIR --seed 1 --steps 300   # another organism, in DIR
"""

import sys

from loopalign.scripts.pretrain_organism import main

if __name__ == "__main__":
    sys.exit(main())
