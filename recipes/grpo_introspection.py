"""Introspection RL: GRPO (or SFT) with concept injection inside the rollouts, evaluated before and after.

    python recipes/grpo_introspection.py                                     # CPU default model, minutes
    python recipes/grpo_introspection.py --config recipes/configs/grpo_introspection_ouro_1.4b.yaml
    accelerate launch recipes/grpo_introspection.py --config ...             # multi-GPU

Concept vectors: ``concept_vectors`` (a data_builders.injection file) or extracted at startup for the first
``n_concepts`` words. Training rows inject at ``train_*`` sites (default: the last loop) on
``1 - control_fraction`` of trials; ``mode: sft`` trains target reports instead of GRPO. Writes ``before/`` and
``after/`` introspection reports, ``compare.md`` and the adapters (``final/``) into ``output_dir``, and prints
detection, identification and false-positive rates per injection loop before and after.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import ModelConfig, TrlParser, get_peft_config

import loopalign  # noqa: F401  (registers Ouro with the Auto classes)
from loopalign.eval.introspection import (
    IntrospectionConfig,
    compare_introspection,
    evaluate_introspection,
    split_concepts,
)
from loopalign.io import atomic_write_text
from loopalign.speed import set_cpu_threads
from loopalign.trainers.introspection_grpo import (
    IntrospectionGRPOConfig,
    IntrospectionGRPOTrainer,
    IntrospectionSFTConfig,
    IntrospectionSFTTrainer,
    introspection_dataset,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_introspection import (  # noqa: E402
    _ints,
    concept_vectors_for,
    default_vector_layer,
    load_model_and_tokenizer,
)

# Used when no --config is given: the CPU default model, a few minutes on 2 CPU cores.
EMBEDDED_DEFAULTS = dict(
    model_name_or_path="organism",
    use_peft=True,
    lora_r=8,
    lora_alpha=16,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    output_dir="outputs/grpo_introspection_default",
    max_steps=16,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=16,
    learning_rate=1e-3,
    beta=0.0,
    logging_steps=4,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    n_concepts=8,
    eval_concepts=4,
    eval_n_controls=16,
    eval_max_new_tokens=16,
    eval_strengths="4",
)


@dataclass
class IntrospectionScriptArguments:
    """Concept vectors, training trials and the before/after evaluation (loops and layers 0-based)."""

    mode: str = field(default="grpo", metadata={"help": "grpo | sft (target reports on injected/control trials)."})
    concept_split: str = field(
        default="held_out",
        metadata={
            "help": "held_out: train on some concepts and evaluate on the others (a fixed hash split); "
            "none: every concept in training and evaluation (what a model was trained on is then measured)."
        },
    )
    held_out_share: float = field(default=0.25, metadata={"help": "Share of concepts held out (concept_split)."})
    n_concepts: int = field(default=8, metadata={"help": "Concept words extracted when no vector file is given."})
    vector_layers: str | None = field(default=None, metadata={"help": "Layers to extract at (default: ~2/3 depth)."})
    vector_loops: int | None = field(default=None, metadata={"help": "Loops run for extraction (default: max eval N)."})
    train_extraction_loops: str | None = field(default=None, metadata={"help": "Default: the model's last loop."})
    train_injection_loops: str | None = field(default=None, metadata={"help": "Default: the model's last loop."})
    train_layers: str | None = field(default=None, metadata={"help": "Default: the vectors' layers."})
    train_strengths: str = field(default="4", metadata={"help": "Comma-separated strengths of training injections."})
    train_rows: int = field(default=256, metadata={"help": "Training trials."})
    control_fraction: float = field(default=0.5, metadata={"help": "Share of control (no-injection) trials."})
    eval_loop_counts: str | None = field(
        default=None, metadata={"help": "Loop counts evaluated (default: the model's)."}
    )
    eval_extraction_loops: str = field(default="all", metadata={"help": "0-based or 'all'."})
    eval_injection_loops: str = field(default="all", metadata={"help": "0-based or 'all'."})
    eval_strengths: str = field(default="2,4", metadata={"help": "Comma-separated eval strengths."})
    eval_concepts: int | None = field(default=None, metadata={"help": "Concepts evaluated (default: all extracted)."})
    eval_trials_per_concept: int = field(default=1, metadata={"help": "Samples per concept per cell."})
    eval_n_controls: int = field(default=50, metadata={"help": "Control trials per loop count."})
    eval_max_new_tokens: int = field(default=100, metadata={"help": "Tokens sampled per eval trial."})
    eval_batch_size: int = field(default=16, metadata={"help": "Trials per generate call."})
    eval_n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples."})
    skip_eval: bool = field(default=False, metadata={"help": "Train only."})

    def __post_init__(self):
        if self.mode not in ("grpo", "sft"):
            raise ValueError(f"mode must be 'grpo' or 'sft', got {self.mode!r}")
        if not 0 <= self.control_fraction < 1:
            raise ValueError(f"control_fraction must be in [0, 1), got {self.control_fraction}")
        if self.concept_split not in ("held_out", "none"):
            raise ValueError(f"concept_split must be 'held_out' or 'none', got {self.concept_split!r}")
        if not 0 < self.held_out_share < 1:
            raise ValueError(f"held_out_share must be in (0, 1), got {self.held_out_share}")


def run_concepts(vectors, script_args) -> tuple[list[str], list[str]]:
    """(training concepts, evaluated concepts) of a run: disjoint with ``concept_split=held_out``."""
    words = list(vectors.vectors)
    if script_args.concept_split == "none":
        return words, words[: script_args.eval_concepts or None]
    train, held_out = split_concepts(words, script_args.held_out_share)
    return train, held_out[: script_args.eval_concepts or None]


def _eval(model, tok, vectors, script_args, out_dir: str, label: str):
    concepts = run_concepts(vectors, script_args)[1]
    ns = _ints(script_args.eval_loop_counts) or [model.config.total_ut_steps]
    cfg = IntrospectionConfig(
        loop_counts=tuple(ns),
        extraction_loops=script_args.eval_extraction_loops,
        injection_loops=script_args.eval_injection_loops,
        strengths=tuple(float(s) for s in script_args.eval_strengths.split(",")),
        concepts=tuple(concepts),
        trials_per_concept=script_args.eval_trials_per_concept,
        n_controls=script_args.eval_n_controls,
        max_new_tokens=script_args.eval_max_new_tokens,
        batch_size=script_args.eval_batch_size,
        n_boot=script_args.eval_n_boot,
        seed=0,
    )
    return evaluate_introspection(model, tok, vectors, cfg, out_dir=out_dir, model_name=label)


def _sft_args(training_args: IntrospectionGRPOConfig) -> IntrospectionSFTConfig:
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    kw = {n: getattr(training_args, n) for n in names if hasattr(training_args, n)}
    kw = {k: v for k, v in kw.items() if not k.startswith("_")}
    kw["concept_vectors"] = training_args.concept_vectors
    return IntrospectionSFTConfig(**kw)


def _rates_table(before, after) -> str:
    if before is None or after is None:
        return ""
    return compare_introspection(before, after)


def main(script_args: IntrospectionScriptArguments, training_args: IntrospectionGRPOConfig, model_args: ModelConfig):
    t0 = time.time()
    set_cpu_threads(on_cpu=training_args.use_cpu or None, announce=training_args.process_index == 0)
    model, tok, label = load_model_and_tokenizer(
        model_args.model_name_or_path, model_args.dtype, "cpu" if training_args.use_cpu else None, training_args.seed
    )
    n_model = int(model.config.total_ut_steps)
    eval_ns = _ints(script_args.eval_loop_counts) or [n_model]
    vec_loops = script_args.vector_loops or max(max(eval_ns), n_model)
    vectors = concept_vectors_for(
        model,
        tok,
        training_args.concept_vectors,
        script_args.n_concepts,
        script_args.vector_layers or default_vector_layer(model.config),
        vec_loops,
    )
    print(
        f"model: {label}; {len(vectors.vectors)} concept vectors at layers {vectors.layers} ({time.time() - t0:.1f}s)"
    )
    last = [n_model - 1]
    train_concepts, eval_concepts = run_concepts(vectors, script_args)
    print(
        f"concepts: training on {len(train_concepts)} ({', '.join(train_concepts)}); evaluating "
        f"{len(eval_concepts)} ({', '.join(eval_concepts)})"
        + (", held out from training" if script_args.concept_split == "held_out" else ", also trained on")
    )
    train_ds = introspection_dataset(
        tok,
        vectors,
        concepts=train_concepts,
        layers=_ints(script_args.train_layers),
        extraction_loops=_ints(script_args.train_extraction_loops) or last,
        injection_loops=_ints(script_args.train_injection_loops) or last,
        strengths=tuple(float(s) for s in script_args.train_strengths.split(",")),
        control_fraction=script_args.control_fraction,
        n_rows=script_args.train_rows,
        seed=training_args.seed,
        with_targets=script_args.mode == "sft",
    )
    out = training_args.output_dir
    main_process = training_args.process_index == 0
    before = None
    if main_process and not script_args.skip_eval:
        t = time.time()
        before = _eval(model, tok, vectors, script_args, os.path.join(out, "before"), label)
        print(f"before training: {len(before.records)} eval trials ({time.time() - t:.1f}s)")

    t = time.time()
    peft_config = get_peft_config(model_args)
    if script_args.mode == "sft":
        trainer = IntrospectionSFTTrainer(
            model=model,
            args=_sft_args(training_args),
            train_dataset=train_ds,
            concept_vectors=vectors,
            processing_class=tok,
            peft_config=peft_config,
        )
    else:
        trainer = IntrospectionGRPOTrainer(
            model=model,
            args=training_args,
            train_dataset=train_ds,
            concept_vectors=vectors,
            processing_class=tok,
            peft_config=peft_config,
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(os.path.join(out, "final"))
    train_time = time.time() - t
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    if logs and main_process:
        keys = ("reward", "introspection/detection", "introspection/identification", "introspection/false_positive")
        print(f"\n{script_args.mode} training: {trainer.state.global_step} steps in {train_time:.1f}s")
        for h in logs:
            shown = {k.split("/")[-1]: round(h[k], 3) for k in ("loss", *keys) if k in h and h[k] is not None}
            print(f"  step {h.get('step')}: {shown}")

    if main_process and not script_args.skip_eval:
        tuned = trainer.accelerator.unwrap_model(trainer.model).eval()
        t = time.time()
        after = _eval(tuned, tok, vectors, script_args, os.path.join(out, "after"), label)
        table = _rates_table(before, after)
        header = (
            f"# Introspection before / after {script_args.mode}\n\nmodel: `{label}`; rates in % (detection and "
            "identification on injected trials, false positives on controls); loops 0-based.\n\n"
        )
        atomic_write_text(os.path.join(out, "compare.md"), header + table)
        print(f"after training ({time.time() - t:.1f}s). Rates per injection loop, before -> after:\n")
        print(table)
        print(f"reports, heatmaps and adapters in {out}/; total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    parser = TrlParser((IntrospectionScriptArguments, IntrospectionGRPOConfig, ModelConfig))
    if "--config" not in sys.argv:
        parser.set_defaults(**EMBEDDED_DEFAULTS)
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
