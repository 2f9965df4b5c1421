"""Launched by test_distributed.py with `accelerate launch` (2 CPU processes, gloo): a few gap-SFT
steps, then every rank writes its trainable tensors (LoRA adapters and probes) for comparison.

    ddp_gap_sft.py OUT [ouro|huginn]     # the family of the tiny model (default ouro)

Each rank also writes the distributed type accelerate ran (``rank{r}.type``), so a test sees that the launch
ran what its config asks for (accelerate runs FSDP on accelerators only: on CPU an FSDP config runs as DDP)."""

import os
import sys

import datasets
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from loopalign import OuroForCausalLM, tiny_config
from loopalign.data.load import DatasetRequest, load_dataset
from loopalign.models.huginn import HuginnForCausalLM, tiny_huginn_config
from loopalign.tokenizer import local_tokenizer
from loopalign.trainers import GapSFTConfig, GapSFTTrainer

FAMILIES = {
    "ouro": (lambda n: OuroForCausalLM(tiny_config(vocab_size=n)), ["q_proj", "v_proj", "down_proj"]),
    "huginn": (lambda n: HuginnForCausalLM(tiny_huginn_config(vocab_size=n)), ["Wqkv", "proj", "fc"]),
}


def _deepspeed_without_its_shm_kernel() -> None:
    """DeepSpeed on CPU JIT-compiles its shared-memory all-reduce kernel (``deepspeed_shm_comm``: about 45 s of C++
    per fresh virtual environment, paid again by each CI leg) before its first collective. Under a DeepSpeed launch
    this marks the kernel unavailable, so DeepSpeed takes the fallback it takes wherever the kernel cannot build
    (torch.distributed over gloo): the subject here is loopalign's trainer under the shipped ZeRO configs, not
    DeepSpeed's kernel."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def main(out: str, family: str = "ouro") -> None:
    _deepspeed_without_its_shm_kernel()
    tok = local_tokenizer()
    data: datasets.Dataset = load_dataset(DatasetRequest("synthetic", limit=16, synthetic_levels=(1,)), tok)[0]
    torch.manual_seed(0)
    make, targets = FAMILIES[family]
    model = make(len(tok))
    args = GapSFTConfig(
        output_dir=os.path.join(out, "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=False,
        # the jointly trained probes too (off by default): their gradients must sync across ranks as well
        loss_weights={"lm": 1.0, "probe": 1.0, "consistency": 1.0},
    )
    trainer = GapSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets),
    )
    trainer.train()
    state = trainer.accelerator
    with open(os.path.join(out, f"rank{state.process_index}.type"), "w") as f:
        f.write(state.distributed_type.name)
    tensors = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    tensors["__world_size"] = torch.tensor(state.num_processes)
    save_file(tensors, os.path.join(out, f"rank{state.process_index}.safetensors"))
    state.end_training()  # as the recipes do: the process group is destroyed before exit


if __name__ == "__main__":
    main(*sys.argv[1:])
