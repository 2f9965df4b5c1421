"""Introspection RL: GRPO (or SFT) with concept injection inside the rollouts, evaluated before and after.

    python recipes/grpo_introspection.py                                     # CPU default model, minutes
    python recipes/grpo_introspection.py --config recipes/configs/grpo_introspection_ouro_1.4b.yaml
    accelerate launch recipes/grpo_introspection.py --config ...             # multi-GPU

Concept vectors: ``concept_vectors`` (a data_builders.injection file) or extracted at startup for the first
``n_concepts`` words. Training rows inject at ``train_*`` sites (default: the last loop) on
``1 - control_fraction`` of trials; ``mode: sft`` trains target reports instead of GRPO. ``norm_matched: true``
makes strengths fractions of the residual-stream norm at the site in training and in both evaluations. Writes ``before/`` and
``after/`` introspection reports, ``compare.md`` and the adapters (``final/``) into ``output_dir``, and prints
detection, identification and false-positive rates per injection loop before and after.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config

import loopalign  # noqa: F401  (registers Ouro with the Auto classes)
from loopalign.errors import ConfigError
from loopalign.eval.introspection import (
    RESULT_RULE,
    IntrospectionConfig,
    check_loop_counts,
    compare_introspection,
    evaluate_introspection,
    naming_rate,
    parse_indices,
    positive_control_verdict,
    resolve_loop_words,
    specificity_verdict,
    split_concepts,
)
from loopalign.eval.introspection.checks import ChecksConfig, checks_markdown, run_checks
from loopalign.eval.introspection.report import format_rate, plot_comparison, specificity_markdown
from loopalign.injection import CONCEPT_WORDS, concept_vectors_for
from loopalign.io import atomic_write_text
from loopalign.loading import load_model
from loopalign.log import command_console
from loopalign.models.contract import trained_loops
from loopalign.scripts.args import apply_cpu_default, make_parser, parse_or_exit, parse_strengths
from loopalign.speed import set_cpu_threads
from loopalign.trainers.introspection import (
    INTROSPECTION_MODES,
    IntrospectionGRPOConfig,
    introspection_dataset,
    make_introspection_trainer,
)
from loopalign.trainers.introspection.data import check_trial_fractions

__all__ = [
    "IntrospectionScriptArguments",
    "IntrospectionGRPOConfig",
    "run_concepts",
    "eval_config",
    "run",
    "parse_args",
    "main",
]


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
    random_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of training trials that inject a random direction at the concept sites (negatives: the "
            "target is no detection)."
        },
    )
    question_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of training trials that ask a 'no'-answer question (none of the evaluation's), half of "
            "them with a concept injected (negatives: the target is 'No.')."
        },
    )
    eval_loop_counts: str | None = field(
        default=None, metadata={"help": "Loop counts evaluated (default: the model's)."}
    )
    eval_extraction_loops: str = field(
        default="all", metadata={"help": "0-based, 'all', or 'last' (the last loop of the largest eval N)."}
    )
    eval_injection_loops: str = field(default="all", metadata={"help": "0-based or 'all'."})
    eval_strengths: str = field(default="2,4", metadata={"help": "Comma-separated eval strengths."})
    eval_concepts: int | None = field(default=None, metadata={"help": "Concepts evaluated (default: all extracted)."})
    eval_trials_per_concept: int = field(default=1, metadata={"help": "Samples per concept per cell."})
    eval_n_controls: int = field(default=50, metadata={"help": "Control trials per loop count."})
    eval_random_vectors: bool = field(default=False, metadata={"help": "Random-vector trials at every strength."})
    eval_n_random: int = field(default=10, metadata={"help": "Random-vector trials per site and strength."})
    eval_control_questions: bool = field(
        default=False, metadata={"help": "'No'-answer questions, injected at every strength and uninjected."}
    )
    eval_n_control_questions: int = field(default=5, metadata={"help": "Control questions per cell."})
    eval_max_new_tokens: int = field(default=100, metadata={"help": "Tokens sampled per eval trial."})
    eval_batch_size: int = field(default=16, metadata={"help": "Trials per generate call."})
    eval_n_boot: int = field(default=1000, metadata={"help": "Unused (Wilson intervals); kept for old configs."})
    eval_checks: bool = field(
        default=False,
        metadata={"help": "Also run Lindsey et al.'s thoughts-vs-text and prefill checks at the trained site."},
    )
    skip_eval: bool = field(default=False, metadata={"help": "Train only."})

    def __post_init__(self):
        if self.mode not in INTROSPECTION_MODES:
            raise ConfigError(f"mode must be 'grpo' or 'sft', got {self.mode!r}")
        check_trial_fractions(self.control_fraction, self.random_fraction, self.question_fraction)
        parse_strengths(self.train_strengths, "train_strengths")  # before the model loads
        parse_strengths(self.eval_strengths, "eval_strengths")
        if self.concept_split not in ("held_out", "none"):
            raise ConfigError(f"concept_split must be 'held_out' or 'none', got {self.concept_split!r}")
        if not 0 < self.held_out_share < 1:
            raise ConfigError(f"held_out_share must be in (0, 1), got {self.held_out_share}")


def run_concepts(vectors, script_args: IntrospectionScriptArguments) -> tuple[list[str], list[str]]:
    """(training concepts, evaluated concepts) of a run: disjoint with ``concept_split=held_out``."""
    words = list(vectors.vectors)
    if script_args.concept_split == "none":
        return words, words[: script_args.eval_concepts or None]
    train, held_out = split_concepts(words, script_args.held_out_share)
    return train, held_out[: script_args.eval_concepts or None]


def eval_config(
    script_args: IntrospectionScriptArguments, concepts, model_loops: int, norm_matched: bool = False
) -> IntrospectionConfig:
    """The before/after evaluation's :class:`IntrospectionConfig` (on ``concepts``); ``norm_matched`` (the
    recipe's ``--norm_matched``, :attr:`IntrospectionGRPOConfig.norm_matched`) makes its strengths fractions of
    the residual-stream norm at the site, as in training."""
    loop_counts = parse_indices(script_args.eval_loop_counts, "eval_loop_counts") or (model_loops,)
    _, extraction_loops = resolve_loop_words(loop_counts, script_args.eval_extraction_loops, model_loops)
    return IntrospectionConfig(
        loop_counts=loop_counts,
        extraction_loops=extraction_loops,
        injection_loops=script_args.eval_injection_loops,
        strengths=parse_strengths(script_args.eval_strengths, "eval_strengths"),
        concepts=tuple(concepts),
        trials_per_concept=script_args.eval_trials_per_concept,
        n_controls=script_args.eval_n_controls,
        random_vectors=script_args.eval_random_vectors,
        n_random=script_args.eval_n_random,
        control_questions=script_args.eval_control_questions,
        n_control_questions=script_args.eval_n_control_questions,
        max_new_tokens=script_args.eval_max_new_tokens,
        batch_size=script_args.eval_batch_size,
        n_boot=script_args.eval_n_boot,
        norm_matched=norm_matched,
        seed=0,
    )


def checks_config(script_args, training_args, concepts, vectors, n_model: int) -> ChecksConfig:
    """Lindsey's checks at the trained site (last training injection loop, first training layer) on ``concepts``."""
    loop = (parse_indices(script_args.train_injection_loops, "train_injection_loops") or (n_model - 1,))[-1]
    ext = (parse_indices(script_args.train_extraction_loops, "train_extraction_loops") or (n_model - 1,))[-1]
    layer = (parse_indices(script_args.train_layers, "train_layers") or tuple(vectors.layers))[0]
    strengths = parse_strengths(script_args.eval_strengths, "eval_strengths")
    return ChecksConfig(num_loops=n_model, extraction_loop=ext, injection_loop=loop, layer=layer, strengths=strengths,
                        concepts=tuple(concepts), max_new_tokens=script_args.eval_max_new_tokens,
                        batch_size=script_args.eval_batch_size, norm_matched=training_args.norm_matched)  # fmt: skip


def result_verdicts(before, after, script_args, n_model: int, n_words: int, trained=()) -> str:
    """Markdown: the result rule, stated before the run, and whether before / after clear it (held-out concepts
    only; with ``concept_split=none`` the evaluated concepts were trained on and it says so)."""
    loop = (parse_indices(script_args.train_injection_loops, "train_injection_loops") or (n_model - 1,))[-1]
    lines = [f"Result rule: {RESULT_RULE}.", ""]
    if script_args.concept_split != "held_out":
        lines += [
            "(concept_split=none: the evaluated concepts were also trained on, so this is not the held-out test.)",
            "",
        ]
    lines += [
        "| | detection − FP | identification | chance | names a trained concept | random-vector claims | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, res in (("before", before), ("after", after)):
        try:
            v = positive_control_verdict(res.summary, loop, n_model, n_words)
        except ValueError:
            continue
        lines.append(
            f"| {label} (N = {n_model}, inj loop {loop}) | {format_rate(v['detection_minus_fp'])} | {format_rate(v['identification'])} "
            f"| {100 * v['chance_identification']:.1f} | {format_rate(naming_rate(res.records, trained, loop, n_model)) if trained else '–'} "
            f"| {format_rate(v['random_detection'])} | "
            f"{'yes' if v['holds'] else 'no'} (detection {'yes' if v['detection_holds'] else 'no'}, identification "
            f"{'yes' if v['identification_holds'] else 'no'}) |"
        )
    # at the trained site: the extraction loop and layers the reports were trained at (None: the vectors' layers)
    trained_site = {
        "extraction_loops": parse_indices(script_args.train_extraction_loops, "train_extraction_loops")
        or (n_model - 1,),
        "layers": parse_indices(script_args.train_layers, "train_layers") or None,
    }
    specific, missing = [], []
    for label, res in (("before", before), ("after", after)):
        try:
            specific.append((label, specificity_verdict(res.records, loop, n_model, n_words, **trained_site)))
        except ValueError as e:
            missing.append(f"{label}: {e}")
    if specific:
        lines += ["", specificity_markdown(specific)]
    if missing:  # said, not dropped: e.g. evaluated at another extraction loop than the one trained
        lines += ["", "The concept-specific rule at the trained site could not be read: " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def run(script_args: IntrospectionScriptArguments, training_args: IntrospectionGRPOConfig, model_args: ModelConfig):
    """Vectors, the before eval, training (GRPO or SFT), the after eval, ``compare.md``."""
    t0 = time.time()
    set_cpu_threads(on_cpu=training_args.use_cpu or None, announce=training_args.process_index == 0)
    name = model_args.model_name_or_path
    model, tok = load_model(name, device="cpu" if training_args.use_cpu else None,
                            dtype=model_args.dtype or "auto", seed=training_args.seed)  # fmt: skip
    label = {"tiny": "tiny (random)"}.get(name, name)
    n_model = trained_loops(model)
    eval_ns = parse_indices(script_args.eval_loop_counts, "eval_loop_counts") or (n_model,)
    check_loop_counts(model, eval_ns, "--eval_loop_counts")
    vec_loops = script_args.vector_loops or max(max(eval_ns), n_model)
    vectors = concept_vectors_for(
        model, tok, training_args.concept_vectors, CONCEPT_WORDS[: script_args.n_concepts],
        parse_indices(script_args.vector_layers, "vector_layers"), vec_loops,
    )  # fmt: skip
    print(
        f"model: {label}; {len(vectors.vectors)} concept vectors at layers {vectors.layers} ({time.time() - t0:.1f}s)"
    )
    last = (n_model - 1,)
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
        layers=parse_indices(script_args.train_layers, "train_layers"),
        extraction_loops=parse_indices(script_args.train_extraction_loops, "train_extraction_loops") or last,
        injection_loops=parse_indices(script_args.train_injection_loops, "train_injection_loops") or last,
        strengths=parse_strengths(script_args.train_strengths, "train_strengths"),
        control_fraction=script_args.control_fraction,
        random_fraction=script_args.random_fraction,
        question_fraction=script_args.question_fraction,
        n_rows=script_args.train_rows,
        seed=training_args.seed,
        with_targets=script_args.mode == "sft",
    )
    out = training_args.output_dir
    main_process = training_args.process_index == 0
    cfg = eval_config(script_args, eval_concepts, n_model, training_args.norm_matched)
    if training_args.norm_matched:
        print("strengths: norm-matched (fractions of the residual-stream norm at the site) in training and evaluation")
    before = None
    if main_process and not script_args.skip_eval:
        t = time.time()
        before = evaluate_introspection(model, tok, vectors, cfg, out_dir=os.path.join(out, "before"),
                                        model_name=label)  # fmt: skip
        if script_args.eval_checks:
            run_checks(model, tok, vectors, checks_config(script_args, training_args, eval_concepts, vectors, n_model),
                       out_dir=os.path.join(out, "before"))  # fmt: skip
        print(f"before training: {len(before.records)} eval trials ({time.time() - t:.1f}s)")

    t = time.time()
    trainer = make_introspection_trainer(
        script_args.mode, model, training_args, train_ds, concept_vectors=vectors, processing_class=tok,
        peft_config=get_peft_config(model_args),
    )  # fmt: skip
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
        after = evaluate_introspection(tuned, tok, vectors, cfg, out_dir=os.path.join(out, "after"), model_name=label)
        table = compare_introspection(before, after)
        header = (
            f"# Introspection before / after {script_args.mode}\n\nmodel: `{label}`; rates in % (detection and "
            "identification on injected trials, false positives on controls); loops 0-based.\n\n"
        )
        if training_args.norm_matched:
            header += (
                "Norm-matched strengths: a strength is a fraction of the residual-stream norm at the injection site "
                "(measured on the uninjected transcript), in training and in both evaluations, not a multiple of "
                "the concept vector.\n\n"
            )
        if script_args.eval_checks:
            checks = run_checks(tuned, tok, vectors, checks_config(script_args, training_args, eval_concepts, vectors,
                                n_model), out_dir=os.path.join(out, "after"))  # fmt: skip
            print(checks_markdown(checks))
        trained = train_concepts if script_args.concept_split == "held_out" else ()
        verdicts = result_verdicts(before, after, script_args, n_model, len(vectors.vectors), trained)
        atomic_write_text(os.path.join(out, "compare.md"), header + verdicts + "\n" + table)
        plot_comparison(before, after, out)  # before_after_{heatmaps,curves}.{png,svg}
        print(f"after training ({time.time() - t:.1f}s). Rates per injection loop, before -> after:\n")
        print(table)
        print(verdicts)
        print(f"reports, heatmaps and adapters in {out}/; total {time.time() - t0:.1f}s")
    # every rank, when its work is done: its process group is destroyed before the interpreter exits (accelerate's
    # end_training); left to interpreter shutdown, gloo can abort a finished rank ("terminate called without an
    # active exception"), failing a run whose results were written
    trainer.accelerator.end_training()
    return trainer


def parse_args(argv: list[str] | None = None):
    """TrlParser over (script arguments, :class:`IntrospectionGRPOConfig`, ModelConfig): ``--config`` YAML plus
    command-line overrides; without ``--config`` the shipped CPU default (``loopalign/configs/grpo_introspection_cpu_default.yaml``) applies."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser((IntrospectionScriptArguments, IntrospectionGRPOConfig, ModelConfig), __doc__)
    if "--config" not in argv:
        apply_cpu_default(parser, "grpo_introspection")
    return parse_or_exit(parser, argv)


def main(argv: list[str] | None = None) -> int:
    command_console()
    run(*parse_args(argv))
    return 0
