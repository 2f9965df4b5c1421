"""Seconds per training step of an sft-gap recipe, as the recipe runs it (its config, data, caches and terms),
without the evaluations: the figures of docs/performance.md's "CPU: the real-model recipe's step".

    python benchmarks/recipe_step.py --config recipes/configs/sft_gap_smollm2_four_families_kl_replay_cpu.yaml \\
        --dataset outputs/statements_smollm2                         # MKRSG300's step
    python benchmarks/recipe_step.py --config recipes/configs/sft_gap_smollm2_cpu.yaml \\
        --dataset outputs/statements_smollm2 --bf16 false             # the 30-minute recipe in float32

Every option after the ones below goes to sft-gap's parser (any of its options overrides the config). The run
builds the data, the replay records and the trainer as ``loopalign sft-gap`` does (so the probe_distill targets
are fitted, the one-time cost printed apart), trains ``--steps`` steps and times steps ``--skip``+1 .. ``--steps``
(the first epoch's: the prefix and base caches still fill, so a long run's later steps are cheaper). Prints one
JSON line. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

from loopalign.scripts import sft_gap
from loopalign.speed import cpu_bf16_is_native
from loopalign.trainers import GapSFTTrainer


class StepClock(TrainerCallback):
    """Wall seconds of every optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=9, help="optimizer steps to run (default 9)")
    parser.add_argument("--skip", type=int, default=4, help="first steps left out of the timing (default 4)")
    ours, recipe_argv = parser.parse_known_args(argv)
    if not 0 <= ours.skip < ours.steps:
        parser.error(f"--skip must be in 0..{ours.steps - 1}")
    with tempfile.TemporaryDirectory() as out:
        recipe_argv = [*recipe_argv, "--output_dir", out, "--max_steps", str(ours.steps), "--report_to", "none"]
        script_args, training_args, model_args = sft_gap.parse_or_exit(sft_gap.build_parser(recipe_argv), recipe_argv)
        sft_gap.set_cpu_threads(on_cpu=training_args.use_cpu or None)
        model, tokenizer = sft_gap.load_model_and_tokenizer(model_args, training_args)
        train_ds, eval_ds = sft_gap.load_datasets(script_args, model_args.model_name_or_path, tokenizer, training_args)
        train_ds, eval_ds, _ = sft_gap.family_eval_sets(script_args, train_ds, eval_ds, training_args)
        replay = None
        if training_args.loss_weights["replay"] > 0:
            replay = sft_gap.replay_records(model, tokenizer, train_ds, script_args, training_args)
        start = time.perf_counter()
        trainer = GapSFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            peft_config=sft_gap.lora_config(model_args, script_args, model.config),
            replay_dataset=replay,
        )
        setup = time.perf_counter() - start
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    timed = clock.seconds[ours.skip :]
    print(
        json.dumps(
            {
                "argv": recipe_argv[:-6],
                "seconds_per_step": round(statistics.mean(timed), 2),
                "steps_timed": f"{ours.skip + 1}..{ours.steps}",
                "min_max": [round(min(timed), 2), round(max(timed), 2)],
                "trainer_setup_s": round(setup, 1),
                "train_records": len(trainer.train_dataset),
                "replay_records": 0 if replay is None else len(replay),
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "native_bf16": cpu_bf16_is_native(),
                "bf16": training_args.bf16,
                "load_average": os.getloadavg()[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
