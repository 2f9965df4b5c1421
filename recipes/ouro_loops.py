"""Per-loop figures of a looped model, before and after a short per-loop (deep-supervision) run.

    python recipes/ouro_loops.py                        # tiny Ouro + local tokenizer, ~1 min on 2 CPU cores
    python recipes/ouro_loops.py --model ByteDance/Ouro-1.4B --steps 0 --loops 8

For every loop count it prints the next-token loss on held-out arithmetic text, the accuracy of
the answer digits (the tokens after "="), and the mean exit probability of that loop.
"""

from __future__ import annotations

import argparse
import random

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopalign import OuroForCausalLM, tiny_config
from loopalign.objectives import per_loop_token_losses, weighted_loop_loss
from loopalign.tokenizer import local_tokenizer


def arithmetic_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        lines.append(f"{a} + {b} = {a + b}" if rng.random() < 0.5 else f"{a + b} - {b} = {a}")
    return lines


def encode(tokenizer, lines: list[str], device) -> dict[str, torch.Tensor]:
    """Tokenize; ``answer_mask`` marks the tokens after "=" (found by character offsets)."""
    batch = tokenizer(lines, return_tensors="pt", padding=True, return_offsets_mapping=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    answer_start = torch.tensor([line.index("=") + 1 for line in lines])[:, None]
    answer = (batch["offset_mapping"][..., 0] >= answer_start) & batch["attention_mask"].bool()
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "labels": labels.to(device),
        "answer_mask": answer.to(device),
    }


@torch.no_grad()
def per_loop_figures(model, batch, num_loops: int) -> list[dict[str, float]]:
    model.eval()
    out = model(
        batch["input_ids"], attention_mask=batch["attention_mask"], num_loops=num_loops, output_loop_states=True
    )
    losses, index = per_loop_token_losses(model.lm_head, out.loop_hidden_states, batch["labels"])
    answer_tokens = batch["answer_mask"].reshape(-1)[index + 1]  # position s predicts token s+1
    target = batch["input_ids"].reshape(-1)[index + 1]
    exit_mean = out.exit_probs.reshape(-1, num_loops)[batch["attention_mask"].reshape(-1).bool()].mean(0)
    rows = []
    for t, hidden in enumerate(out.loop_hidden_states):
        pred = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[index]).argmax(-1)
        correct = (pred == target)[answer_tokens].float()
        rows.append(
            {
                "loop": t + 1,
                "loss": losses[t].mean().item(),
                "answer_acc": correct.mean().item(),
                "exit_prob": exit_mean[t].item(),
            }
        )
    return rows


def print_table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}\n| loop | loss | answer-token acc | exit prob |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['loop']} | {r['loss']:.3f} | {r['answer_acc']:.3f} | {r['exit_prob']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random tiny Ouro), a folder or a hub name")
    parser.add_argument("--steps", type=int, default=300, help="training steps (0: only measure)")
    parser.add_argument("--loops", type=int, default=None, help="loop counts to report (default: trained depth + 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 0 or args.batch_size < 1:
        parser.error("--steps must be >= 0 and --batch-size >= 1")

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "tiny":
        tokenizer = local_tokenizer()
        model = OuroForCausalLM(tiny_config(vocab_size=len(tokenizer))).to(device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    trained = model.config.total_ut_steps
    report_loops = args.loops or trained + 2
    held_out = encode(tokenizer, arithmetic_lines(256, seed=args.seed + 1), device)
    print_table(
        f"Before training ({args.model}, {trained} trained loops)", per_loop_figures(model, held_out, report_loops)
    )
    if args.steps == 0:
        return

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    uniform = [1.0 / trained] * trained
    bar = tqdm(range(args.steps), desc="per-loop training", mininterval=1.0)
    for step in bar:
        model.train()
        batch = encode(tokenizer, arithmetic_lines(args.batch_size, seed=args.seed * 100_003 + step + 2), device)
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_loop_states=True)
        token_losses, _ = per_loop_token_losses(model.lm_head, out.loop_hidden_states, batch["labels"])
        loss, per_loop = weighted_loop_loss(token_losses, uniform)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}", last_loop=f"{per_loop[-1].item():.3f}")
    print_table(
        f"After {args.steps} steps of uniform per-loop training", per_loop_figures(model, held_out, report_loops)
    )


if __name__ == "__main__":
    main()
