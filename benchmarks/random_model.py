"""Save a random-weight Ouro of a benchmark shape (with the local tokenizer) as a model folder, so the recipes can
run end to end at a real size without a hub download:

    python benchmarks/random_model.py --shape 1.4b --dtype bf16 --device cuda --out /tmp/ouro-1.4b-random
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sft_gap.py \\
        --model_name_or_path /tmp/ouro-1.4b-random --dataset synthetic --max_steps 5 --bf16 true ...

The recipe writes ``timings.json`` (the wall time of each phase). Random weights answer and verify at chance:
the figures such a run prints are timings, never results. The folder is written atomically (a build folder,
then a rename); an existing one is refused unless ``--force`` (replaced only once the new one is complete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ouro_forward import DTYPES, SHAPES  # noqa: E402

from loopalign import OuroForCausalLM  # noqa: E402
from loopalign.io import atomic_folder  # noqa: E402
from loopalign.tokenizer import local_tokenizer  # noqa: E402


def save_random_model(shape: str, out: str, dtype: str = "fp32", device: str = "cpu", seed: int = 0) -> dict:
    """Build ``SHAPES[shape]`` with random weights (vocabulary at least the local tokenizer's), save it with the
    tokenizer into ``out``; -> what was saved (parameters, dtype, seconds)."""
    t = time.perf_counter()
    tokenizer = local_tokenizer()
    config = SHAPES[shape]()
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    torch.manual_seed(seed)
    with torch.device(device):
        model = OuroForCausalLM(config)
    model = model.to(DTYPES[dtype])
    info = {"shape": shape, "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()), "seed": seed}
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "random_model.json"), "w") as f:
            json.dump(info, f, indent=1)
    return {**info, "out": out, "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu", help="where the weights are initialised (cuda is much faster)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    if os.path.exists(args.out) and not args.force:
        parser.error(
            f"--out {args.out} exists; pass --force to replace it (the old folder stays until the new one is written)"
        )
    print(json.dumps(save_random_model(args.shape, args.out, args.dtype, args.device, args.seed)))


if __name__ == "__main__":
    main()
