"""A Huginn-shaped model organism: the organism's tasks and data (:mod:`loopalign.organism`), trained from scratch
on a CPU with deep supervision over recurrence steps, so per-step SV / RR figures of the recurrent-depth family
can be read next to the Ouro organism's.

The recurrent block has the Ouro organism's shared layers and width (``OrganismConfig.num_layers``,
``hidden_size``), plus a prelude and a coda of one block each; it runs ``num_loops`` steps from the zero state.
Huginn has no exit gate, so the objective is the uniform mean of the per-step losses (every step's readout
supervised), with gradients through every step.

    python -m loopalign.organism.huginn OUT_DIR        # train, save model + tokenizer, evaluate into OUT_DIR/eval
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from loopalign.models.huginn import HuginnConfig, HuginnForCausalLM, tiny_huginn_config
from loopalign.objectives import per_loop_token_losses, weighted_loop_loss
from loopalign.tokenizer import local_tokenizer

from .config import OrganismConfig
from .data import training_batch
from .evaluate import evaluate_organism
from .train import TrainResult, _lr_at, torch_threads

__all__ = ["huginn_organism_config", "train_huginn_organism"]


def huginn_organism_config(config: OrganismConfig, vocab_size: int, prelude: int = 1, coda: int = 1) -> HuginnConfig:
    """The Huginn shape of the organism: prelude / ``config.num_layers`` recurrent layers / coda, its width and
    heads, ``config.num_loops`` steps by default, zero initial state."""
    return tiny_huginn_config(
        vocab_size=vocab_size,
        n_embd=config.hidden_size,
        n_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        n_layers_in_prelude=prelude,
        n_layers_in_recurrent_block=config.num_layers,
        n_layers_in_coda=coda,
        block_size=max(config.max_length, 256),
        mean_recurrence=config.num_loops,
        mean_backprop_depth=config.num_loops,
        init_scale=0.0,
    )


def train_huginn_organism(
    config: OrganismConfig | None = None, prelude: int = 1, coda: int = 1, progress: bool = True
) -> TrainResult:
    """Train a Huginn-shaped organism from scratch with ``config.num_threads`` threads (deterministic by
    ``config.seed`` on a given machine). ``loop_losses`` holds the per-step mean CE of every optimiser step."""
    config = config or OrganismConfig()
    tokenizer = local_tokenizer(config.vocab_size)
    uniform = [1.0 / config.num_loops] * config.num_loops
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = HuginnForCausalLM(huginn_organism_config(config, len(tokenizer), prelude, coda))
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            betas=(0.9, 0.95),
        )
        result = TrainResult(model=model, tokenizer=tokenizer)
        model.train()
        start = time.perf_counter()
        bar = tqdm(range(config.steps), desc="huginn organism", disable=not progress, mininterval=2.0)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(config, step)
            parts = training_batch(config, tokenizer, step)
            n_total = sum(float(part["weights"].sum()) for part in parts)
            step_loss, step_loops = 0.0, torch.zeros(config.num_loops)
            for part in parts:
                # right padding: real tokens never attend to the pads after them, so no mask is needed
                out = model(part["input_ids"], output_loop_states=True, use_cache=False, logits_to_keep=1)
                token_losses, index = per_loop_token_losses(model.lm_head, out.loop_hidden_states, part["labels"])
                weight = part["weights"].reshape(-1).index_select(0, index + 1)  # the target token's weight
                weighted = token_losses * (weight / weight.mean())
                loss = weighted_loop_loss(weighted, uniform)[0]
                share = float(weight.sum()) / n_total
                (loss * share).backward()
                step_loss += float(loss.detach()) * share
                step_loops += (token_losses.detach() * weight).sum(dim=1) / n_total
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(step_loss)
            result.loop_losses.append([round(float(x), 5) for x in step_loops])
            if progress:
                bar.set_postfix(loss=f"{step_loss:.3f}", steps="/".join(f"{x:.2f}" for x in step_loops), refresh=False)
        result.seconds = time.perf_counter() - start
    model.eval()
    return result


def main(argv: list[str] | None = None) -> int:
    """Train with the default OrganismConfig, save to OUT_DIR, evaluate as the organism's card does."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m loopalign.organism.huginn OUT_DIR")
    out = argv[0]
    config = OrganismConfig()
    result = train_huginn_organism(config)
    result.model.save_pretrained(out)
    result.tokenizer.save_pretrained(out)
    print(f"trained in {result.seconds:.0f}s; final per-step losses {result.loop_losses[-1]}")
    gap = evaluate_organism(result.model, result.tokenizer, config, out_dir=f"{out}/eval")
    print(gap.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
