"""Heal a retrofitted plain LM toward its source (issue #34 item 2; docs/real-models.md) and save it for eval-gap.

    python benchmarks/heal_retrofit.py --model smollm2-135m --block 12-18 --loops 2,3,4 --steps 100 \
        --out outputs/healed_smollm2_12_18
    loopalign eval-gap --model_name_or_path outputs/healed_smollm2_12_18 --dataset statements --eval_loops 1-6 ...

The text healed on is the base model's own greedy answers (``--max_new_tokens``) to the 42 general replay questions
(``loopalign.data.replay_questions``) and to the statements' entity requests ("Tell me about the city of ..."): no
corpus download, and none of it is a statement the evaluation scores. Prints the KL(base || looped) per loop count
before and after, writes ``healing.json`` and the healed model (LoRA merged) with its tokenizer to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from loopalign.data.replay_questions import GENERAL_REPLAY_QUESTIONS
from loopalign.data.sources.statements import statement_records
from loopalign.io import atomic_write_text
from loopalign.loading import load_model
from loopalign.loops import parse_loop_counts
from loopalign.models.retrofit import RetrofitConfig, retrofit_recurrence
from loopalign.trainers.healing import HealingConfig, heal_looped
from loopalign.trainers.replay import self_replay_dataset

logger = logging.getLogger("heal_retrofit")


def healing_text(model, tokenizer, n_entities: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids of prompt + the base model's own answer, for the general questions and some entity requests."""
    records = statement_records("city_country", 300, seed=0, eval_fraction=0.3)
    # training-split entities only (the split sft-gap and eval-gap use): no held-out entity's text is healed on
    requests = list(dict.fromkeys(r["task"] for r in records if json.loads(r["meta"])["split"] == "train"))
    build = self_replay_dataset(
        model,
        tokenizer,
        list(GENERAL_REPLAY_QUESTIONS) + requests[:n_entities],
        num_loops=1,
        max_new_tokens=max_new_tokens,
        keep_cut=True,
    )
    return [list(r["input_ids"]) + list(r["completion_ids"]) for r in build.dataset]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--block", default="12-18", help="the recurrent block's layers 'A-B' (as eval-gap --retrofit)")
    parser.add_argument("--loops", default="2,3,4", help="loop counts healed toward the source")
    parser.add_argument("--eval_loops", default="1-6", help="loop counts the KL is reported at")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--entities", type=int, default=40, help="entity requests beside the general questions")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = make_parser().parse_args(argv)
    torch.manual_seed(0)
    base, tok = load_model(args.model, device="cpu")
    start, end = (int(x) for x in args.block.split("-"))
    layers = len(base.model.layers)
    spec = RetrofitConfig(prelude=(0, start), recurrent=(start, end), coda=(end, layers), adapter_init="sum",
                          init_scale=0.0)  # fmt: skip
    looped = retrofit_recurrence(base, spec)
    sequences = healing_text(base, tok, args.entities, args.max_new_tokens)
    pad = tok.pad_token_id
    report = parse_loop_counts(args.eval_loops, "eval_loops")
    config = HealingConfig(loops=parse_loop_counts(args.loops, "loops"), steps=args.steps,
                           learning_rate=args.learning_rate, batch_size=args.batch_size)  # fmt: skip
    # the KL before and after at every reported loop count, measured once (by heal_looped)
    healed, result = heal_looped(looped, base, sequences, config, pad, report_loops=report)
    before, after = result.kl_before, result.kl_after
    lines = ["| loops | KL before | KL after |", "|---|---|---|"]
    lines += [f"| {t} | {before[t]:.4f} | {after[t]:.4f} |" for t in report]
    logger.info("\n".join(lines))
    merged = healed.merge_and_unload()
    merged.config.retrofit = {**merged.config.retrofit, "healed": {"loops": list(config.loops), "steps": args.steps}}
    os.makedirs(args.out, exist_ok=True)
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    summary = {"model": args.model, "block": args.block, "sequences": len(sequences), **result.to_dict(),
               "kl_before_report": before, "kl_after_report": after}  # fmt: skip
    atomic_write_text(os.path.join(args.out, "healing.json"), json.dumps(summary, indent=1))
    logger.info(
        f"healed in {result.seconds:.0f} s ({result.trainable_parameters} trainable parameters); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
