"""Concept-injection introspection eval (Lindsey et al. protocol, per loop) of a looped model.

    python recipes/eval_introspection.py                                     # CPU default model, about a minute
    python recipes/eval_introspection.py --config recipes/configs/eval_introspection_ouro_1.4b.yaml

Concept vectors come from ``concept_vectors`` (a data_builders.injection .safetensors file) or are
extracted at startup (``n_concepts`` words, ``vector_layers``). Writes ``introspection.json``,
``introspection.md``, ``trials.jsonl`` and ``identification_heatmap.{png,svg}`` into ``output_dir``, and prints
detection / identification / false-positive rates per (loop count, injection loop).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import loopalign  # noqa: F401  (registers Ouro with the Auto classes)
from loopalign.errors import ConfigError
from loopalign.eval.introspection import (
    RESULT_RULE,
    IntrospectionConfig,
    check_loop_counts,
    evaluate_introspection,
    parse_indices,
    positive_control_verdict,
    resolve_loop_words,
    specificity_verdict,
    split_concepts,
)
from loopalign.eval.introspection.checks import ChecksConfig, checks_markdown, run_checks
from loopalign.eval.introspection.report import format_rate, specificity_markdown
from loopalign.eval.introspection.trials import REPORT_FORMATS
from loopalign.injection import CONCEPT_WORDS, concept_vectors_for
from loopalign.loading import load_model
from loopalign.log import command_console
from loopalign.models.contract import num_hidden_layers, trained_loops
from loopalign.organism.introspection import INTROSPECTION_ORGANISM
from loopalign.scripts.args import (
    apply_cpu_default,
    cpu_device,
    make_parser,
    parse_or_exit,
    parse_strengths,
    reporting_targets,
)
from loopalign.speed import set_cpu_threads

__all__ = [
    "EvalIntrospectionArguments",
    "intro_config",
    "vector_layers",
    "run",
    "parse_args",
    "main",
]


@dataclass
class EvalIntrospectionArguments:
    """Model, concept vectors and the trial grid (loops and layers 0-based; loop counts >= 1). The grid fields
    are :class:`IntrospectionConfig`'s, as text for the command line and YAML (see :func:`intro_config`)."""

    model_name_or_path: str = field(
        default=INTROSPECTION_ORGANISM,
        metadata={
            "help": f"'{INTROSPECTION_ORGANISM}' (CPU organism that knows the concept words), 'organism' (the gap "
            "organism), 'tiny', a folder or hub name."
        },
    )
    dtype: str | None = field(default=None, metadata={"help": "Weights dtype: bfloat16 | float16 | float32."})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)."})
    use_cpu: bool = field(
        default=False, metadata={"help": "Run on the CPU (sft-gap's option, TRL's name): the same as --device cpu."}
    )
    concept_vectors: str | None = field(
        default=None, metadata={"help": "Concept vectors .safetensors (default: extract)."}
    )
    n_concepts: int = field(default=8, metadata={"help": "Concept words to extract when no vector file is given."})
    concept_split: str = field(
        default="none",
        metadata={
            "help": "held_out: evaluate only the held-out share of the concepts (split_concepts, the split the GRPO "
            "recipe trains on the rest of); none: every concept."
        },
    )
    held_out_share: float = field(default=0.25, metadata={"help": "Share of concepts held out (concept_split)."})
    vector_layers: str | None = field(
        default=None,
        metadata={"help": "Layers to extract vectors at, e.g. '16' or '10-18' (default: about 2/3 depth)."},
    )
    layer_sweep: bool = field(
        default=False,
        metadata={"help": "Extract vectors at every layer and inject at each: the (layer x loop) heatmaps."},
    )
    loop_counts: str = field(
        default="trained",
        metadata={"help": "Total loop counts N, e.g. '1-8'; 'trained' = the model's trained depth (1 for a plain LM)."},
    )
    extraction_loops: str = field(
        default="all", metadata={"help": "0-based, 'all' = every loop < N, 'last' = the last loop of the largest N."}
    )
    injection_loops: str = field(default="all", metadata={"help": "0-based, 'all' = every loop < N."})
    layers: str | None = field(default=None, metadata={"help": "Injection layers (default: the vectors' layers)."})
    strengths: str = field(default="1,2,4,8", metadata={"help": "Comma-separated strengths."})
    trials_per_concept: int = field(default=1, metadata={"help": "Samples per concept per cell."})
    n_controls: int = field(default=50, metadata={"help": "No-injection control trials per loop count."})
    random_vectors: bool = field(default=False, metadata={"help": "Also run random norm-matched vectors."})
    norm_matched: bool = field(
        default=False,
        metadata={
            "help": "Strengths as fractions of the residual-stream norm at the site, not multiples of the vector."
        },
    )
    n_random: int = field(default=10, metadata={"help": "Random-vector trials per (N, ext, inj, layer)."})
    control_questions: bool = field(default=False, metadata={"help": "Also ask 'no'-answer questions, injected."})
    n_control_questions: int = field(default=5, metadata={"help": "Control questions per cell."})
    report_format: str = field(
        default="free",
        metadata={
            "help": "free: the protocol's question, answered in free text and graded by the rules; structured: the "
            "question asks for 'Answer: yes/no' and 'Concept: <one word>', graded exactly."
        },
    )
    lindsey_checks: bool = field(
        default=False,
        metadata={
            "help": "Also run Lindsey et al.'s thoughts-vs-text and prefill checks at the last loop, first vector layer."
        },
    )
    max_new_tokens: int = field(default=100, metadata={"help": "Tokens sampled per trial."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    batch_size: int = field(default=16, metadata={"help": "Trials per generate call."})
    n_boot: int = field(default=1000, metadata={"help": "Unused (Wilson intervals); kept for old configs."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(default="outputs/eval_introspection", metadata={"help": "Where the reports go."})
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "wandb to log the rates (offline without an API key); none (the default): nothing."},
    )

    def __post_init__(self):
        self.report_to = reporting_targets(self.report_to)
        self.device = cpu_device(self.device, self.use_cpu)
        if self.concept_split not in ("held_out", "none"):
            raise ConfigError(f"concept_split must be 'held_out' or 'none', got {self.concept_split!r}")
        if self.report_format not in REPORT_FORMATS:  # before the model loads, not when the trials are built
            raise ConfigError(f"report_format must be one of {REPORT_FORMATS}, got {self.report_format!r}")
        if not 0 < self.held_out_share < 1:
            raise ConfigError(f"held_out_share must be in (0, 1), got {self.held_out_share}")
        parse_strengths(self.strengths)  # before the model loads


def intro_config(args: EvalIntrospectionArguments, depth: int, **overrides) -> IntrospectionConfig:
    """The library's :class:`IntrospectionConfig` from the script arguments (``overrides`` win) for a model of
    trained depth ``depth`` (see :func:`resolve_loop_words`)."""
    loop_counts, extraction_loops = resolve_loop_words(args.loop_counts, args.extraction_loops, depth)
    kw = dict(
        loop_counts=loop_counts,
        extraction_loops=extraction_loops,
        injection_loops=args.injection_loops,
        layers=args.layers,
        strengths=parse_strengths(args.strengths),
        trials_per_concept=args.trials_per_concept,
        n_controls=args.n_controls,
        random_vectors=args.random_vectors,
        norm_matched=args.norm_matched,
        n_random=args.n_random,
        control_questions=args.control_questions,
        n_control_questions=args.n_control_questions,
        report_format=args.report_format,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    kw.update(overrides)
    return IntrospectionConfig(**kw)


def vector_layers(args: EvalIntrospectionArguments, model) -> tuple[int, ...] | None:
    """Layers to extract concept vectors at: every layer with ``layer_sweep``, else ``vector_layers`` (None: the
    default layer, about 2/3 of the depth)."""
    if args.layer_sweep:
        if args.vector_layers or args.layers:
            raise ValueError("layer_sweep extracts and injects at every layer: leave vector_layers and layers out")
        return tuple(range(num_hidden_layers(model)))
    return parse_indices(args.vector_layers, "vector_layers")


def run(args: EvalIntrospectionArguments) -> dict:
    """Load the model, get the concept vectors, run the protocol, write and print the reports."""
    t0 = time.time()
    set_cpu_threads(on_cpu=args.device == "cpu" or None, announce=True)
    model, tok = load_model(args.model_name_or_path, device=args.device, dtype=args.dtype or "auto",
                            seed=args.seed)  # fmt: skip
    label = {"tiny": "tiny (random)"}.get(args.model_name_or_path, args.model_name_or_path)
    depth = trained_loops(model)
    cfg = intro_config(args, depth)
    check_loop_counts(model, cfg.loop_counts, "--loop_counts")
    max_n = max(cfg.loop_counts or (depth,))
    vectors = concept_vectors_for(
        model, tok, args.concept_vectors, CONCEPT_WORDS[: args.n_concepts], vector_layers(args, model), max_n
    )
    print(f"model: {label}; concept vectors: {len(vectors.vectors)} words, layers {vectors.layers}, "
          f"{vectors.num_loops} loops ({time.time() - t0:.1f}s)")  # fmt: skip
    if args.concept_split == "held_out":
        held_out = split_concepts(list(vectors.vectors), args.held_out_share)[1]
        cfg = intro_config(args, depth, concepts=tuple(held_out))
        print(f"evaluating the {len(held_out)} held-out concepts: {', '.join(held_out)}")
    result = evaluate_introspection(model, tok, vectors, cfg, out_dir=args.output_dir, model_name=label)
    print(result.markdown().split("\n## Cells")[0])
    n, last = max(result.config["loop_counts"] or [max_n]), max_n - 1
    if any(r["injection_loop"] == last and r["num_loops"] == n for r in result.summary["by_injection_loop"]):
        v = positive_control_verdict(result.summary, last, n, len(CONCEPT_WORDS))
        print(f"Result rule: {RESULT_RULE}.\nAt N = {n}, injection loop {last}: detection − FP "
              f"{format_rate(v['detection_minus_fp'])}, identification {format_rate(v['identification'])} (chance "
              f"{100 * v['chance_identification']:.1f}): {'holds' if v['holds'] else 'does not hold'}.")  # fmt: skip
        print(specificity_markdown([("evaluated", specificity_verdict(result.records, last, n, len(CONCEPT_WORDS)))]))
    if args.lindsey_checks:
        ext = max(cfg.extraction_loops or (vectors.num_loops - 1,))
        checks = ChecksConfig(num_loops=n, extraction_loop=min(ext, vectors.num_loops - 1), injection_loop=last,
                              layer=vectors.layers[0], strengths=cfg.strengths, concepts=cfg.concepts,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                              norm_matched=cfg.norm_matched)  # fmt: skip
        print(checks_markdown(run_checks(model, tok, vectors, checks, out_dir=args.output_dir)))
    print(f"reports in {args.output_dir}/ ({time.time() - t0:.1f}s)")
    if "wandb" in (args.report_to or []):
        import wandb

        mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
        run_ = wandb.init(project="loopalign", name=os.path.basename(args.output_dir), mode=mode)
        result.log_wandb(run_)
        run_.finish()
    return result.to_dict()


def parse_args(argv: list[str] | None = None) -> EvalIntrospectionArguments:
    """TrlParser over :class:`EvalIntrospectionArguments`: ``--config`` YAML plus command-line overrides;
    without ``--config`` the shipped CPU default (``loopalign/configs/eval_introspection_cpu_default.yaml``) applies."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser((EvalIntrospectionArguments,), __doc__)
    if "--config" not in argv:
        apply_cpu_default(parser, "eval_introspection")
    (args,) = parse_or_exit(parser, argv)  # a bad value: the usage line and the message, exit status 2
    return args


def main(argv: list[str] | None = None) -> int:
    command_console()
    run(parse_args(argv))
    return 0
