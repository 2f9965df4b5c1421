"""Launched by test_distributed.py with `accelerate launch` (2 CPU processes, gloo): a few gap-SFT
steps, then every rank writes its trainable tensors (LoRA adapters and probes) for comparison."""

import os
import sys

import datasets
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from loopalign import OuroForCausalLM, tiny_config
from loopalign.tokenizer import local_tokenizer
from loopalign.trainers import GapSFTConfig, GapSFTTrainer
from loopalign.trainers.gap_data import synthetic_verification


def main(out: str) -> None:
    tok = local_tokenizer()
    data: datasets.Dataset = synthetic_verification(tok, n_problems=16, levels=(1,), seed=0)
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok)))
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
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    trainer.train()
    state = trainer.accelerator
    assert state.num_processes == 2, state.num_processes
    tensors = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    tensors["__world_size"] = torch.tensor(state.num_processes)
    save_file(tensors, os.path.join(out, f"rank{state.process_index}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
