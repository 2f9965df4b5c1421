"""Throughput and peak memory of the gap evaluator: feature extraction (one forward per batch
serves every loop and layer) and probe fitting.

    python benchmarks/eval_gap.py                       # tiny Ouro on CPU
    python benchmarks/eval_gap.py --shape 1.4b --n 256 --seq 256 --loops 8   # Ouro-1.4B shape, random weights, GPU
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from loopalign import OuroForCausalLM, tiny_config
from loopalign.eval import FeatureConfig, ProbeFitConfig, ReadoutConfig, extract_features, fit_readout, prepare_records

SHAPES = {
    "tiny": {},
    "1.4b": dict(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        max_position_embeddings=65536,
    ),
    "2.6b": dict(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        max_position_embeddings=65536,
    ),
}


def synthetic_records(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(seq // 2, seq + 1))
        ids = rng.integers(3, vocab, length).tolist()
        rows.append(
            {
                "id": f"b{i}",
                "task": f"t{i // 2}",
                "input_ids": ids,
                "label": i % 2,
                "verdict_index": length - 1,
                "probe_indices": [length // 2, length - 1],
            }
        )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=128, help="records")
    ap.add_argument("--seq", type=int, default=64, help="max record length (tokens)")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices (L = normed state)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--skip-probes", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = tiny_config(**SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = OuroForCausalLM(cfg).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    records = prepare_records(synthetic_records(args.n, args.seq, cfg.vocab_size))
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    fcfg = FeatureConfig(batch_size=args.batch_size, layers=layers)
    loops = list(range(1, args.loops + 1))
    extract_features(model, records[: args.batch_size], loops, (3, 4), fcfg)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    feats = extract_features(model, records, loops, (3, 4), fcfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(len(r.input_ids) for r in records)
    print(
        f"shape={args.shape} params={params / 1e6:.1f}M device={device} dtype={dtype} loops={args.loops} "
        f"layers kept={len(feats.layers)} records={args.n} batch={args.batch_size}"
    )
    print(
        f"features: {args.n / dt:.1f} examples/s, {tokens / dt:.0f} tokens/s ({dt:.2f} s); "
        f"kept features {feats.states.numel() * feats.states.element_size() / 2**20:.1f} MiB on CPU"
    )
    if device.type == "cuda":
        print(f"peak GPU memory (features): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if not args.skip_probes:
        t0 = time.perf_counter()
        rcfg = ReadoutConfig(l2_grid=(1e-3, 1e-1, 10.0), fit=ProbeFitConfig(max_iter=100, device=str(device)))
        fit_readout(feats, rcfg)
        dt = time.perf_counter() - t0
        n_fits = len(feats.loops) * len(feats.layers)
        print(f"probes: {n_fits} (loop, layer) sites x 3 L2 in {dt:.2f} s ({n_fits / dt:.1f} sites/s)")
        if device.type == "cuda":
            print(f"peak GPU memory (all): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"peak host RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
