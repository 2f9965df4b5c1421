"""Throughput and peak memory of the native Ouro: forward of all loops (as a plain transformers
call and as loopalign's evaluation does it), and forward+backward.

    python benchmarks/ouro_forward.py                               # tiny shape on CPU
    python benchmarks/ouro_forward.py --shape 1.4b --batch 32 --seq 512 --dtype bf16 --lora   # GPU, random weights

Cases:
- ``forward, full logits``: ``model(input_ids)``, the last loop's logits at every position
  [B,S,V] (what a plain transformers forward returns; the public baseline's inference forward);
- ``forward, eval path``: every loop's state, logits only where the evaluator reads them
  (``logits_to_keep=1`` and one position per loop);
- with ``--lora`` (PEFT LoRA r=16 on every linear layer): the eval path with the adapters as
  PEFT runs them, and folded into the weights by :func:`loopalign.lora.merged_lora`;
- with ``--compile``: the eval path (and with ``--lora`` the merged one) again with the decoder
  layers compiled (:func:`loopalign.speed.compile_decoder_layers`, as ``FeatureConfig.compile_layers``
  does; compilation happens in the warm-up calls);
- ``forward+backward`` (all-token LM loss), optionally with activation checkpointing.

FLOPs per token (forward, matmuls only): T * L * (2 * params_per_layer + 4 * S * H_attn)
+ 2 * H * V for one head readout (attention scores and values over the full square, as is
customary); forward+backward = 3x. MFU = achieved / --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from loopalign import OuroConfig, OuroForCausalLM, tiny_config
from loopalign.loops import loop_logits

SHAPES = {
    "tiny": lambda: tiny_config(vocab_size=1024),
    # CPU-sized, matmul-bound: hidden 512, 6 layers, the real 49,152-token vocabulary
    "small": lambda: OuroConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
    ),  # fmt: skip
    "1.4b": lambda: OuroConfig(),  # defaults are Ouro-1.4B's
    "2.6b": lambda: OuroConfig(num_hidden_layers=48),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(config: OuroConfig, seq: int, num_loops: int) -> float:
    """Forward FLOPs per token (matmuls only)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attn_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = 2 * (h * attn_dim + 2 * h * kv_dim + attn_dim * h + 3 * h * i)
    attention = 2 * 2 * seq * attn_dim
    return num_loops * L * (per_layer + attention) + 2 * h * config.vocab_size


def peak_memory_gib(device: torch.device) -> float | None:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (it cannot be
    reset, so on CPU a later case reports at least an earlier one's figure)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    except ImportError:  # pragma: no cover
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(step, steps: int, warmup: int, device) -> float:
    """Seconds per call of ``step()`` after ``warmup`` untimed calls."""
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


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
    parser.add_argument("--lora", action="store_true", help="also time the eval path with LoRA, unmerged and merged")
    parser.add_argument("--no-backward", action="store_true", help="skip forward+backward")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing for forward+backward")
    parser.add_argument("--compile", action="store_true", help="also time the eval path with compiled layers")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
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
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq, num_loops)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=device)
    last = torch.full((args.batch, 1), args.seq - 1, device=device)

    def full_logits(m):
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)

    def eval_path(m):
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=False, output_loop_states=True, logits_to_keep=1)
            loop_logits(m.get_output_embeddings(), out.loop_hidden_states, last)

    model.eval()
    results = []

    def run(name, step, context=None):
        with context or contextlib.nullcontext():
            seconds = bench(step, args.steps, args.warmup, device)
        results.append((name, seconds, 1, peak_memory_gib(device)))

    # the plain model's cases first: get_peft_model below wraps its layers in place
    run("forward, full logits", lambda: full_logits(model))
    run("forward, eval path", lambda: eval_path(model))
    if args.compile:
        from loopalign.speed import compiled_decoder_layers

        compiled = lambda m: compiled_decoder_layers(m, backend=args.compile_backend)  # noqa: E731
        run("forward, eval path, compiled layers", lambda: eval_path(model), compiled(model))
    lora_model = None
    if args.lora:
        from peft import LoraConfig, get_peft_model

        from loopalign.lora import merged_lora

        lora_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
        run("forward, eval path, LoRA (PEFT, unmerged)", lambda: eval_path(lora_model))
        run("forward, eval path, LoRA merged", lambda: eval_path(lora_model), merged_lora(lora_model, strict=True))
        if args.compile:
            both = _stacked(merged_lora(lora_model, strict=True), compiled(lora_model))
            run("forward, eval path, LoRA merged, compiled layers", lambda: eval_path(lora_model), both)
    if not args.no_backward:
        train_model = lora_model if lora_model is not None else model  # LoRA training, or full
        if args.checkpointing:
            train_model.activation_checkpointing_enable({"use_reentrant": False})
        train_model.train()

        def train_step():
            train_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            train_model.zero_grad(set_to_none=True)

        seconds = bench(train_step, args.steps, args.warmup, device)
        results.append(("forward+backward", seconds, 3, peak_memory_gib(device)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} shape={args.shape} dtype={args.dtype} batch={args.batch} "
          f"seq={args.seq} loops={num_loops} attn={args.attn}")  # fmt: skip
    print(f"params: {sum(p.numel() for p in model.parameters()):,}  flops/token (fwd): {fpt:,.0f}")
    for case, seconds, factor, peak_mem in results:
        flops = fpt * tokens * factor / seconds
        row = {
            "case": case,
            "tokens_per_s": round(tokens / seconds, 1),
            "peak_mem_gib": round(peak_mem or 0.0, 3),
            "tflops": round(flops / 1e12, 3),
            "mfu": round(flops / (peak * 1e12), 4) if peak else None,
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
