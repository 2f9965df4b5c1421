"""Gap SFT: LoRA adapters that make self-verification catch up with the representation readout, per loop,
measured before and after (the body is loopalign.scripts.sft_gap; `loopalign sft-gap` runs the same code).

    accelerate launch recipes/sft_gap.py                                  # embedded CPU default (the organism), minutes
    accelerate launch recipes/sft_gap.py --config recipes/configs/sft_gap_ouro_1.4b_gsm8k.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/sft_gap.py --config ...
    accelerate launch --config_file accelerate_configs/cpu_multi_process.yaml recipes/sft_gap.py   # 2 CPU processes
    python recipes/sft_gap.py --help
"""

import sys

from loopalign.scripts.sft_gap import main

if __name__ == "__main__":
    sys.exit(main())
