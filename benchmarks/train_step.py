"""One training step, four ways, side by side in one run: tokens/s, peak memory, MFU.

    python benchmarks/train_step.py                              # tiny shape on CPU
    python benchmarks/train_step.py --shape 1.4b --seq 2048 --batch 4 --dtype bf16 --checkpointing \\
        --policy save_attention --compile                        # the issue's GPU setting

Cases (all: PEFT LoRA r=16 on every linear layer of the decoder, AdamW, every token labelled):
1. ``baseline``: what a plain transformers + PEFT loop does (the public Ouro + PEFT baseline):
   ``model(input_ids, labels=input_ids)``, the last loop's logits for every position [B,S,V] and
   one cross-entropy over them; full activation checkpointing when ``--checkpointing``.
2. ``naive deep supervision``: the same, plus ``lm_head`` + cross-entropy on every loop's full
   state (T x [B,S,V] logits).
3. ``last-loop LM (loopalign)``: GapSFTTrainer's code path with only the last loop's LM term.
4. ``gap-SFT (loopalign)``: GapSFTTrainer's full step: T-loop deep supervision, per-loop probes
   and probe-consistency.
Cases 3 and 4 take the speed options (``--policy``, ``--compile``); ``overhead`` of case 4 is over
case 3 (the cost of the deep-supervision and probe terms), ``speedup`` is over case 1.

FLOPs (model FLOPs, the usual MFU convention: recomputation by checkpointing is not counted):
per token, forward = T * L * (2 * params_per_layer + 4 * S * H_attn) + 2 * H * V (see
benchmarks/ouro_forward.py), and a training step = 3 x forward. MFU = achieved / --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import datasets
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
from ouro_forward import DTYPES, SHAPES, bench, flops_per_token, peak_memory_gib  # noqa: E402

from loopalign import OuroForCausalLM  # noqa: E402
from loopalign.speed import CHECKPOINT_POLICIES  # noqa: E402
from loopalign.tokenizer import local_tokenizer  # noqa: E402
from loopalign.trainers import GapSFTConfig, GapSFTTrainer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_records(n: int, seq: int, vocab: int) -> datasets.Dataset:
    """Rendered-record-shaped rows of random tokens: a prompt of ``seq - 2`` tokens (+ verdict, end)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq - 2,), generator=g).tolist()
        rows.append({"id": f"r{i}", "input_ids": ids, "label": i % 2, "verdict_index": len(ids) - 1,
                     "answer_end_index": len(ids) - 8})  # fmt: skip
    return datasets.Dataset.from_list(rows)


def lora_config(r: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)


def timed(step, n_steps: int, warmup: int, device) -> float:
    """Seconds per ``step(i)`` after ``warmup`` untimed steps (i counts every call)."""
    calls = iter(range(warmup + n_steps))
    return bench(lambda: step(next(calls)), n_steps, warmup, device)


def baseline_case(model, args, ids, device, deep_supervision: bool) -> float:
    """A plain transformers + PEFT loop: full logits, one (or T) cross-entropies, AdamW."""
    model = get_peft_model(model, lora_config(args.lora_r))
    if args.checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def step(i):
        batch = ids[i % len(ids)]
        with autocast:
            out = model(input_ids=batch, labels=batch, use_cache=False, output_loop_states=deep_supervision)
            loss = out.loss
            if deep_supervision:
                head = model.get_output_embeddings()
                shift = batch[:, 1:].reshape(-1)
                for h in out.loop_hidden_states:
                    logits = head(h)[:, :-1].float()
                    loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args.steps, args.warmup, device)


def trainer_case(model, tok, args, data, device, plain: bool) -> float:
    """GapSFTTrainer's real step (compute_loss, backward, optimizer) on the same LoRA model."""
    ckpt = {"policy": args.policy} if args.checkpointing else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GapSFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            max_steps=args.warmup + args.steps,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=args.dtype == "bf16",
            gradient_checkpointing=args.checkpointing,
            activation_checkpointing_kwargs=ckpt,
            compile_layers=args.compile,
            loss_weights={"lm": 1.0, "probe": 0.0, "consistency": 0.0} if plain else None,
            loop_weighting="last" if plain else "uniform",
            completion_only_loss=False,  # every token labelled, as in the baseline
            max_length=None,
        )
        trainer = GapSFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                                peft_config=lora_config(args.lora_r))  # fmt: skip
        trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
        if args.checkpointing:  # what Trainer.train does first
            model.activation_checkpointing_enable(ckpt)
        loader = trainer.get_train_dataloader()
        batches = [trainer._prepare_inputs(b) for _, b in zip(range(args.warmup + args.steps), loader)]

        def step(i):
            trainer.training_step(model, batches[i])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        return timed(step, args.steps, args.warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every case")
    parser.add_argument("--policy", choices=sorted(CHECKPOINT_POLICIES), default="full",
                        help="loopalign cases: what a checkpointed layer keeps")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="loopalign cases: torch.compile the decoder layers")
    parser.add_argument("--cases", default="1,2,3,4", help="which cases to run (comma-separated numbers)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: 989 on CUDA)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = local_tokenizer()
    config = SHAPES[args.shape]()
    config.vocab_size = max(config.vocab_size, len(tok))

    def model_fn():
        torch.manual_seed(0)
        with torch.device(device):
            return OuroForCausalLM(config).to(DTYPES[args.dtype])

    n = args.batch * (args.warmup + args.steps)
    data = random_records(n, args.seq, config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    tokens = args.batch * args.seq
    fpt = 3 * flops_per_token(config, args.seq, config.total_ut_steps)
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    cases = {
        1: ("baseline: last-loop LM, full logits (transformers + PEFT)", lambda: baseline_case(model_fn(), args, ids, device, False)),
        2: ("naive deep supervision: T full-logit readouts", lambda: baseline_case(model_fn(), args, ids, device, True)),
        3: ("last-loop LM (loopalign)", lambda: trainer_case(model_fn(), tok, args, data, device, plain=True)),
        4: ("gap-SFT: T-loop deep supervision + probes + consistency (loopalign)", lambda: trainer_case(model_fn(), tok, args, data, device, plain=False)),
    }  # fmt: skip
    chosen = [int(c) for c in args.cases.split(",")]
    if any(c not in cases for c in chosen):
        parser.error(f"--cases takes numbers from {sorted(cases)}, got {args.cases!r}")
    if args.child:  # one case in this process: its peak memory is its own
        (c,) = chosen
        seconds = cases[c][1]()
        print(json.dumps({"case": c, "seconds": seconds, "peak_mem_gib": peak_memory_gib(device) or 0.0}))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} shape={args.shape} dtype={args.dtype} batch={args.batch} "
          f"seq={args.seq} lora_r={args.lora_r} checkpointing={args.checkpointing} policy={args.policy} "
          f"compile={args.compile}")  # fmt: skip
    print(f"model FLOPs per trained token: {fpt:,.0f} (3 x forward); each case runs in its own process")
    seconds = {}
    for c in chosen:
        argv = [a for a in sys.argv[1:]] + ["--cases", str(c), "--child"]
        done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"case {c} failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        seconds[c] = result["seconds"]
        achieved = fpt * tokens / seconds[c]
        row = {
            "case": c,
            "what": cases[c][0],
            "tokens_per_s": round(tokens / seconds[c], 1),
            "step_s": round(seconds[c], 4),
            "peak_mem_gib": round(result["peak_mem_gib"], 3),
            "tflops": round(achieved / 1e12, 4),
            "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
        }
        if c == 4 and 3 in seconds:
            row["overhead_vs_case_3"] = round(seconds[4] / seconds[3] - 1, 3)
        if c in (3, 4) and 1 in seconds:
            row["speedup_vs_baseline"] = round(seconds[1] / seconds[c], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
