"""One training step, five ways, side by side in one run: tokens/s, peak memory, MFU.

    python benchmarks/train_step.py                              # tiny shape on CPU
    python benchmarks/train_step.py --shape 1.4b --seq 2048 --batch 4 --dtype bf16 --checkpointing \\
        --policy save_attention --compile                        # the issue's GPU setting

Every case: PEFT LoRA r=16 on every linear layer of the decoder (float32 adapters, PEFT's default),
the model's weights in ``--dtype``, the step under the same autocast (``--dtype`` bf16/fp16: autocast
to it; fp32: none), AdamW, every token labelled. Each row reports the autocast state and the
activation dtype that the first LoRA layer saw, so an unequal case shows.

1. ``reference``: what the public Ouro + PEFT does with ``labels=``: the head on every loop's full
   state (T full-logit readouts [B,S,V]), their exit-probability-weighted mixture, one
   cross-entropy (the reference's loss, equal to loopalign's ``exit="expected"`` loss); full
   activation checkpointing with ``--checkpointing``. The baseline of ``speedup_vs_baseline``.
2. ``naive deep supervision``: the head and a cross-entropy on every loop's full state.
3. ``last-loop LM (loopalign)``: GapSFTTrainer's code path with only the last loop's LM term.
4. ``gap-SFT (loopalign)``: GapSFTTrainer's full step: T-loop deep supervision, per-loop probes
   and probe-consistency.
5. ``last-loop LM, plain loop``: a plain transformers + PEFT loop on the last loop's logits (one
   readout): lighter than the reference it is often taken for (T - 1 fewer [B,S,V] logits).
Cases 3 and 4 take the speed options (``--policy``, ``--compile``); ``overhead_vs_case_3`` of case 4
is the cost of the deep-supervision and probe terms.

FLOPs (model FLOPs, the usual MFU convention: recomputation by checkpointing and extra head
readouts are not counted, so every case is measured against the same work): per token,
forward = T * L * (2 * params_per_layer + 4 * S * H_attn) + 2 * H * V (see benchmarks/ouro_forward.py),
and a training step = 3 x forward. MFU = achieved / --peak-tflops. Memory: CUDA's peak allocated,
or on a CPU the peak RSS of the case's own process.
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


def autocast_for(dtype: str, device: torch.device):
    """The one autocast context every case's step runs under."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


class PrecisionProbe:
    """Records, at the first call of the first LoRA layer, the autocast state and the dtypes there."""

    def __init__(self, model, device: torch.device):
        self.seen: dict | None = None
        layer = next(m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A))
        self.device = device
        self.handle = layer.register_forward_pre_hook(self._hook)
        self.adapter_dtype = str(next(iter(layer.lora_A.values())).weight.dtype).replace("torch.", "")

    def _hook(self, module, args):
        if self.seen is None:
            self.seen = {
                "autocast": torch.is_autocast_enabled(self.device.type),
                "activation_dtype": str(args[0].dtype).replace("torch.", ""),
                "adapter_dtype": self.adapter_dtype,
            }
        return None


def reference_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """The public reference's ``labels=`` loss, computed as it computes it: the head on each loop's
    full state (T logits [B,S,V]), mixed by the exit probabilities, one next-token cross-entropy."""
    out = model(input_ids=batch, use_cache=False, output_loop_states=True, logits_to_keep=1)
    head = model.get_output_embeddings()
    probs = out.exit_probs  # [B,S,T]
    mixture = sum(head(h) * probs[..., t, None].to(h.dtype) for t, h in enumerate(out.loop_hidden_states))
    logits = mixture[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def plain_case(model, args, ids, device, readouts: str) -> tuple[float, dict]:
    """A plain transformers + PEFT loop, AdamW. ``readouts``: "reference" (T readouts, mixed),
    "deep" (T readouts, T cross-entropies) or "last" (the last loop's logits only)."""
    model = get_peft_model(model, lora_config(args.lora_r))
    if args.checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    probe = PrecisionProbe(model, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(i):
        batch = ids[i % len(ids)]
        with autocast_for(args.dtype, device):
            if readouts == "reference":
                loss = reference_loss(model, batch)
            else:
                out = model(input_ids=batch, labels=batch, use_cache=False, output_loop_states=readouts == "deep")
                loss = out.loss
                if readouts == "deep":
                    head = model.get_output_embeddings()
                    shift = batch[:, 1:].reshape(-1)
                    for h in out.loop_hidden_states:
                        logits = head(h)[:, :-1].float()
                        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args.steps, args.warmup, device), probe.seen


def trainer_case(model, tok, args, data, device, plain: bool) -> tuple[float, dict]:
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

        probe = PrecisionProbe(model, device)

        def step(i):
            with autocast_for(args.dtype, device):  # as in every case (accelerate's own is nested in it)
                trainer.training_step(model, batches[i])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        return timed(step, args.steps, args.warmup, device), probe.seen


def flop_formula(config, seq: int) -> str:
    """The FLOP count of a training step per token, with its terms filled in."""
    h, i, L, T = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.total_ut_steps
    attn_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    params = h * attn_dim + 2 * h * kv_dim + attn_dim * h + 3 * h * i
    total = 3 * flops_per_token(config, seq, T)
    return (
        f"3 x [T*L*(2*P_layer + 4*S*H_attn) + 2*H*V] = 3 x [{T}*{L}*(2*{params:,} + 4*{seq}*{attn_dim}) "
        f"+ 2*{h}*{config.vocab_size:,}] = {total:,.0f} FLOP per trained token"
    )


def save_matmuls_gib(config, tokens: int, lora_r: int, bytes_per: int) -> float:
    """What ``--policy save_matmuls`` keeps for backward, estimated: per token and layer call, every
    projection's output, its LoRA A (r) and B (projection width) outputs, and attention's output."""
    h, i = config.hidden_size, config.intermediate_size
    attn_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    projections = attn_dim + 2 * kv_dim + h + 2 * i + h  # q, k, v, o, gate, up, down
    per_call = projections + (7 * lora_r + projections) + attn_dim
    calls = config.total_ut_steps * config.num_hidden_layers
    return calls * tokens * per_call * bytes_per / 2**30


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
    parser.add_argument("--cases", default="1,2,3,4,5", help="which cases to run (comma-separated numbers)")
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
        1: ("reference: T full-logit readouts, exit-mixture CE (public Ouro + PEFT)", lambda: plain_case(model_fn(), args, ids, device, "reference")),
        2: ("naive deep supervision: T full-logit readouts, T CEs (plain PEFT loop)", lambda: plain_case(model_fn(), args, ids, device, "deep")),
        3: ("last-loop LM (loopalign GapSFTTrainer)", lambda: trainer_case(model_fn(), tok, args, data, device, plain=True)),
        4: ("gap-SFT: T-loop deep supervision + probes + consistency (loopalign GapSFTTrainer)", lambda: trainer_case(model_fn(), tok, args, data, device, plain=False)),
        5: ("last-loop LM, 1 full-logit readout (plain PEFT loop)", lambda: plain_case(model_fn(), args, ids, device, "last")),
    }  # fmt: skip
    chosen = [int(c) for c in args.cases.split(",")]
    if any(c not in cases for c in chosen):
        parser.error(f"--cases takes numbers from {sorted(cases)}, got {args.cases!r}")
    if args.child:  # one case in this process: its peak memory is its own
        (c,) = chosen
        seconds, precision = cases[c][1]()
        row = {"case": c, "seconds": seconds, "peak_mem_gib": peak_memory_gib(device) or 0.0, **(precision or {})}
        print(json.dumps(row))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} shape={args.shape} dtype={args.dtype} batch={args.batch} "
          f"seq={args.seq} lora_r={args.lora_r} checkpointing={args.checkpointing} policy={args.policy} "
          f"compile={args.compile} autocast={'off' if args.dtype == 'fp32' else args.dtype} (every case)")  # fmt: skip
    print(f"model FLOPs: {flop_formula(config, args.seq)}; each case runs in its own process")
    bytes_per = torch.finfo(DTYPES[args.dtype]).bits // 8
    print(f"save_matmuls would keep ~{save_matmuls_gib(config, tokens, args.lora_r, bytes_per):,.2f} GiB of matmul "
          "outputs at this shape and batch (on top of weights and optimizer state): use it only where that fits "
          "the memory target (short sequences, small batches), else save_attention")  # fmt: skip
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
            "autocast": result.get("autocast"),
            "activation_dtype": result.get("activation_dtype"),
            "adapter_dtype": result.get("adapter_dtype"),
        }
        if c == 4 and 3 in seconds:
            row["overhead_vs_case_3"] = round(seconds[4] / seconds[3] - 1, 3)
        if c != 1 and 1 in seconds:
            row["speedup_vs_baseline"] = round(seconds[1] / seconds[c], 3)
        if c == 5:
            row["note"] = "1 readout: lighter than the reference (case 1), which computes T"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
