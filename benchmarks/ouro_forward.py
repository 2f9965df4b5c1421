"""Throughput and peak memory of the native Ouro: forward (all loops) and forward+backward.

    python benchmarks/ouro_forward.py                               # tiny shape on CPU
    python benchmarks/ouro_forward.py --shape 1.4b --batch 4 --seq 2048 --dtype bf16   # on a GPU, random weights

Prints tokens/s, peak memory and MFU. FLOPs per token (forward) are counted as
2 * N_loop_params * T + 2 * L * T * S * H_attn * 2 (attention scores and values, causal halves
it: we count the full square as is customary) + 2 * H * V for the head; forward+backward = 3x.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loopalign import OuroConfig, OuroForCausalLM, tiny_config

SHAPES = {
    "tiny": lambda: tiny_config(vocab_size=1024),
    "1.4b": lambda: OuroConfig(),  # defaults are Ouro-1.4B's
    "2.6b": lambda: OuroConfig(num_hidden_layers=48),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flops_per_token(config: OuroConfig, seq: int, num_loops: int) -> float:
    """Forward FLOPs per token (matmuls only)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attn_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = 2 * (h * attn_dim + 2 * h * kv_dim + attn_dim * h + 3 * h * i)
    attention = 2 * 2 * seq * attn_dim
    return num_loops * L * (per_layer + attention) + 2 * h * config.vocab_size


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    except ImportError:  # pragma: no cover
        return None


def bench(model, batch, seq, steps, warmup, backward, device) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        if backward:
            out = model(ids, labels=ids, use_cache=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(ids, use_cache=False, output_loop_states=True, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--loops", type=int, default=None, help="default: config.total_ut_steps")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for forward+backward")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: 989 on CUDA)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = SHAPES[args.shape]()
    config._attn_implementation = args.attn
    num_loops = args.loops or config.total_ut_steps
    config.total_ut_steps = num_loops
    torch.manual_seed(0)
    with torch.device(device):
        model = OuroForCausalLM(config).to(DTYPES[args.dtype])
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq, num_loops)
    results = []
    for name, backward in (("forward (all loops)", False), ("forward+backward", True)):
        model.train(backward)
        seconds = bench(model, args.batch, args.seq, args.steps, args.warmup, backward, device)
        flops = fpt * tokens * (3 if backward else 1) / seconds
        results.append(
            {
                "case": name,
                "shape": args.shape,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "dtype": args.dtype,
                "batch": args.batch,
                "seq": args.seq,
                "loops": num_loops,
                "tokens_per_s": round(tokens / seconds, 1),
                "peak_mem_gib": round(peak_memory_gib(device) or 0.0, 3),
                "tflops": round(flops / 1e12, 3),
                "mfu": round(flops / (peak * 1e12), 4) if peak else None,
            }
        )
    params = sum(p.numel() for p in model.parameters())
    print(f"params: {params:,}  flops/token (fwd): {fpt:,.0f}")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
