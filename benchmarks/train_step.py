"""Throughput, peak memory and MFU of one gap-SFT training step (GapSFTTrainer's real code path),
side by side with a plain last-loop LM-loss step on the same LoRA model.

    python benchmarks/train_step.py                                      # tiny shape on CPU
    python benchmarks/train_step.py --shape 1.4b --seq 2048 --batch 4 --dtype bf16 --checkpointing   # GPU

FLOPs (model FLOPs, the usual MFU convention: recomputation by checkpointing is not counted):
per token, forward = T * L * (2 * params_per_layer + 4 * S * H_attn) + 2 * H * V  (see
benchmarks/ouro_forward.py), and a training step = 3 x forward. MFU = achieved / --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import datasets
import torch
from peft import LoraConfig

sys.path.insert(0, os.path.dirname(__file__))
from ouro_forward import DTYPES, SHAPES, flops_per_token, peak_memory_gib  # noqa: E402

from loopalign import OuroForCausalLM  # noqa: E402
from loopalign.tokenizer import local_tokenizer  # noqa: E402
from loopalign.trainers import GapSFTConfig, GapSFTTrainer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_records(n: int, seq: int, vocab: int, yes_no: tuple[int, int]) -> datasets.Dataset:
    """Rendered-record-shaped rows of random tokens: prompt of ``seq - 2`` tokens (+ verdict, end)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq - 2,), generator=g).tolist()
        rows.append(
            {
                "id": f"r{i}",
                "input_ids": ids,
                "label": i % 2,
                "verdict_index": len(ids) - 1,
                "answer_end_index": len(ids) - 8,
            }
        )
    return datasets.Dataset.from_list(rows)


def run_case(name, model_fn, tok, args, data, steps, warmup, device, loss_weights, plain):
    model = model_fn()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GapSFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            max_steps=warmup + steps,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=args.dtype == "bf16",
            gradient_checkpointing=args.checkpointing,
            loss_weights=loss_weights,
            loop_weighting="last" if plain else "uniform",
            max_length=None,
        )
        trainer = GapSFTTrainer(
            model=model,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=TARGETS),
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=warmup + steps)
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
        loader = trainer.get_train_dataloader()
        batches = [trainer._prepare_inputs(b) for _, b in zip(range(warmup + steps), loader)]
        for i, batch in enumerate(batches):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
            trainer.training_step(model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: 989 on CUDA)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = local_tokenizer()
    config = SHAPES[args.shape]()
    config.vocab_size = max(config.vocab_size, len(tok))

    def model_fn():
        torch.manual_seed(0)
        with torch.device(device):
            return OuroForCausalLM(config).to(DTYPES[args.dtype])

    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    data = random_records(args.batch * (args.warmup + args.steps), args.seq, config.vocab_size, (yes, no))
    tokens = args.batch * args.seq
    fpt = 3 * flops_per_token(config, args.seq, config.total_ut_steps)
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    cases = [
        ("plain last-loop LM loss", {"lm": 1.0, "probe": 0.0, "consistency": 0.0}, True),
        ("gap-SFT (4-loop LM + probes + consistency)", {"lm": 1.0, "probe": 1.0, "consistency": 1.0}, False),
    ]
    print(f"shape={args.shape} device={device} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"lora_r={args.lora_r} checkpointing={args.checkpointing}")  # fmt: skip
    print(f"model FLOPs per trained token: {fpt:,.0f} (3 x forward)")
    # one untimed pass first: allocator, thread pools and kernels warm up in the process, not in a case
    run_case(*cases[0][:1], model_fn, tok, args, data, 1, 1, device, cases[0][1], cases[0][2])
    base = None
    for name, weights, plain in cases:
        seconds = run_case(name, model_fn, tok, args, data, args.steps, args.warmup, device, weights, plain)
        base = base or seconds
        achieved = fpt * tokens / seconds
        print(
            json.dumps(
                {
                    "case": name,
                    "tokens_per_s": round(tokens / seconds, 1),
                    "step_s": round(seconds, 4),
                    "overhead_vs_plain": round(seconds / base - 1, 3),
                    "peak_mem_gib": round(peak_memory_gib(device) or 0.0, 3),
                    "tflops": round(achieved / 1e12, 4),
                    "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
                }
            )
        )


if __name__ == "__main__":
    main()
