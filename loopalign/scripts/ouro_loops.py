"""Per-loop figures of a looped model, before and after a short per-loop (deep-supervision) run.

    python recipes/ouro_loops.py                         # tiny Ouro + local tokenizer, ~1 min on 2 CPU cores
    loopalign ouro-loops --model_name_or_path ByteDance/Ouro-1.4B --max_steps 0 --eval_loops 1-8
    loopalign ouro-loops --config my_loops.yaml --seed 1  # YAML, command-line options override it

For every loop count in ``eval_loops`` (default 1 to the model's depth + 2) it prints the next-token
loss on held-out arithmetic text, the accuracy of the answer digits (the tokens after "="), and
the mean exit probability of that loop.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from loopalign import OuroForCausalLM, tiny_config
from loopalign.errors import ConfigError
from loopalign.loading import load_pretrained, load_tokenizer
from loopalign.log import command_console
from loopalign.loops import parse_loop_counts
from loopalign.objectives import per_loop_token_losses, weighted_loop_loss
from loopalign.scripts.args import default_eval_loops, make_parser, parse_or_exit
from loopalign.tokenizer import local_tokenizer


@dataclass
class OuroLoopsScriptArguments:
    """The model, the per-loop training run and the loops reported."""

    model_name_or_path: str = field(
        default="tiny", metadata={"help": "'tiny' (random tiny Ouro), a folder or hub name."}
    )
    max_steps: int = field(default=300, metadata={"help": "Per-loop training steps (0: only measure)."})
    eval_loops: str | None = field(
        default=None, metadata={"help": "Loop counts reported (1-based, e.g. 1-8); default 1 to the model's depth + 2."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Sequences per training step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and the data."})

    def __post_init__(self):
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.per_device_train_batch_size < 1:
            raise ConfigError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.eval_loops is not None:
            parse_loop_counts(self.eval_loops, "eval_loops")


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
    """Loss, answer-token accuracy and mean exit probability after each of loops 1..num_loops."""
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


def report(model, batch, loops: list[int]) -> list[dict[str, float]]:
    """The rows of ``per_loop_figures`` for the loop counts in ``loops``."""
    return [row for row in per_loop_figures(model, batch, max(loops)) if row["loop"] in loops]


def run(args: OuroLoopsScriptArguments) -> dict[str, list[dict[str, float]]]:
    """Measure, train ``max_steps`` steps of uniform per-loop loss, measure again. -> {"before": rows, "after": rows}."""
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model_name_or_path == "tiny":
        tokenizer = local_tokenizer()
        model = OuroForCausalLM(tiny_config(vocab_size=len(tokenizer))).to(device)
    else:
        model = load_pretrained(args.model_name_or_path).to(device)
        tokenizer = load_tokenizer(args.model_name_or_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    trained = model.config.total_ut_steps
    loops = (
        parse_loop_counts(args.eval_loops, "eval_loops")
        if args.eval_loops is not None
        else default_eval_loops(model.config)
    )
    held_out = encode(tokenizer, arithmetic_lines(256, seed=args.seed + 1), device)
    rows = {"before": report(model, held_out, loops)}
    print_table(f"Before training ({args.model_name_or_path}, {trained} trained loops)", rows["before"])
    if args.max_steps == 0:
        return rows

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    uniform = [1.0 / trained] * trained
    bar = tqdm(range(args.max_steps), desc="per-loop training", mininterval=1.0)
    for step in bar:
        model.train()
        lines = arithmetic_lines(args.per_device_train_batch_size, seed=args.seed * 100_003 + step + 2)
        batch = encode(tokenizer, lines, device)
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_loop_states=True)
        token_losses, _ = per_loop_token_losses(model.lm_head, out.loop_hidden_states, batch["labels"])
        loss, per_loop = weighted_loop_loss(token_losses, uniform)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}", last_loop=f"{per_loop[-1].item():.3f}")
    rows["after"] = report(model, held_out, loops)
    print_table(f"After {args.max_steps} steps of uniform per-loop training", rows["after"])
    return rows


def build_parser(argv: list[str] | None = None):
    """The script's ``TrlParser`` (OuroLoopsScriptArguments; YAML with ``--config``)."""
    return make_parser((OuroLoopsScriptArguments,), __doc__)


def main(argv: list[str] | None = None) -> int:
    """``recipes/ouro_loops.py`` / ``loopalign ouro-loops``: parse ``argv`` (default ``sys.argv[1:]``) and run."""
    command_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = parse_or_exit(build_parser(argv), argv)
    run(args)
    return 0
