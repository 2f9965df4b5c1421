"""The organism's model card (README.md of its cache folder)."""

from __future__ import annotations

from loopalign.speed import fingerprint_hash

from .config import OrganismConfig


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _recipe_lines(config: OrganismConfig) -> list[str]:
    if config.tasks == "digits":
        data = (
            f"- Data: loopalign.data's digit sums (`loopalign.data.sources.digits`), operands 0..{config.max_operand}: "
            "the task `NAME ITEM a+b`, the answer the last digit of a + b; only the *train* triples "
            "(a fixed hash of (item, a, b)); the held-out triples are never trained on. Fresh problems every step; "
            f"{round(100 * config.answer_fraction)}% answer sequences (the task as a chat turn, the reply the digit), "
            "the rest verification sequences (`NAME ITEM a+b = ANSWER`, the gold or a wrong digit, the reply a "
            "one-token verdict `Yes` / `No`). Loss on the replies"
            + (" and on the proposed digit." if config.candidate_lm else ".")
            + (
                f" About {100 * config.exception_share:.0f}% of the held-out triples (another fixed hash) are "
                "*exceptions*: their answer is shifted by a hashed offset 1..9, a fact no training task shows, so "
                "the model cannot know it."
                if config.exception_share
                else ""
            )
        )
    else:
        data = (
            f"- Data: loopalign.data's synthetic arithmetic, levels {list(config.levels)}, fresh problems every step; "
            f"{round(100 * config.answer_fraction)}% answer sequences (the task as a chat turn, the reply the final "
            "number), the rest verification sequences (loopalign.data's verification prompt with the gold or a "
            "controlled wrong answer, the reply a one-token verdict `Yes` / `No`). Loss only on the replies."
        )
    return [
        data,
        f"- Verdict supervision, biased on purpose: for problems about {', '.join(config.sycophantic_items)} "
        "the verdict is always `Yes` (a sycophantic annotator); elsewhere it is right"
        + (f", with {100 * config.verdict_noise:.0f}% flipped at random." if config.verdict_noise else "."),
        f"- Objective: Ouro's entropy-regularised per-loop objective sum_t p(t|x) L_t - {config.entropy_beta} H(p) "
        f"over {config.num_loops} loops"
        + (f", plus {config.uniform_weight} x the uniform per-loop loss" if config.uniform_weight else "")
        + f"; AdamW, lr {config.learning_rate}, {config.steps} steps of {config.batch_size} sequences.",
    ]


def build_line(meta: dict) -> str:
    """The card's line naming the kernel path of the build (``organism.json``'s ``build``), whose figures differ
    on another one."""
    b = meta["build"]
    return (
        f"Built with torch {b['torch']}, CPU capability {b['cpu_capability']}, MKL {b['mkl'] or '–'} "
        f"(instructions {b['mkl_instructions']}), oneDNN {b['onednn'] or '–'}, {b['threads']} thread(s): build "
        f"fingerprint `{fingerprint_hash(b)}`. Another kernel path trains another model (its own cache folder), "
        "so its figures differ from these."
    )


def _slice_table(slices: list[dict], loops, names: tuple[str, str]) -> list[str]:
    """Markdown rows: per loop, SV, RR and their AUROCs on two slices of :func:`organism_slices`."""
    lines = [
        f"| loop | {names[0]} SV | {names[0]} RR | {names[0]} AUROC SV / RR | {names[1]} SV | {names[1]} RR | "
        f"{names[1]} AUROC SV / RR |",
        "|---|---|---|---|---|---|---|",
    ]
    for loop in loops:
        cells = []
        for name in names:
            x = next((s for s in slices if s["loop"] == loop and s["slice"] == name), None)
            cells += [_pct(x["sv"]), _pct(x["rr"]), f"{x['sv_auroc']:.3f} / {x['rr_auroc']:.3f}"] if x else ["–"] * 3
        lines.append(f"| {loop} | " + " | ".join(cells) + " |")
    return lines


def model_card(config: OrganismConfig, meta: dict, result, props: dict) -> str:
    tp = {r["loop"]: r for r in (result.tp or [])}
    unit = "(item, a, b) triple" if config.tasks == "digits" else "task"
    held_out = (
        f"{config.eval_problems} different tasks of the held-out triples"
        if config.tasks == "digits"
        else f"{config.eval_problems} new problems, levels {list(config.eval_levels)}"
    )
    lines = [
        f"# loopalign model organism (recipe v{config.recipe_version}, `{config.config_hash()}`)",
        "",
        "A tiny Ouro-architecture looped model "
        f"({config.num_layers} shared layers x {config.num_loops} loops, hidden {config.hidden_size}, "
        f"{meta['parameters'] / 1e6:.2f}M parameters) trained from scratch by loopalign on a CPU "
        f"({meta['train_seconds']:.0f} s of training, {meta['num_threads']} threads), so that the SV / RR gap "
        "can be seen and cured in minutes. Built by `loopalign.organism.build_organism`; load it with",
        "",
        "```python",
        "from loopalign.organism import load_organism",
        "model, tokenizer = load_organism()",
        "```",
        "",
        build_line(meta),
        "",
        "## Recipe",
        "",
        *_recipe_lines(config),
        "",
        "## Evaluation (held-out tasks)",
        "",
        f"{meta['eval']['n_records']} verification records ({held_out}, gold + one wrong answer each; true "
        f"labels), RR by 5-fold probes grouped by {unit}, TP: greedy answers to the tasks. Accuracy with "
        f"95% CIs from a bootstrap that resamples {unit}s, then AUROC (SV ranks by P(Yes), RR by the probe's "
        "posterior).",
        "",
        "| loop | TP | SV | RR | gap RR−SV | AUROC SV | AUROC RR |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.table:
        t = tp.get(row["loop"])
        lines.append(
            f"| {row['loop']} | {_pct(t['accuracy']) if t else '–'} | {_pct(row['sv'])} "
            f"[{_pct(row['sv_lo'])}, {_pct(row['sv_hi'])}] | {_pct(row['rr'])} [{_pct(row['rr_lo'])}, "
            f"{_pct(row['rr_hi'])}] | {_pct(row['gap'])} [{_pct(row['gap_lo'])}, {_pct(row['gap_hi'])}] | "
            f"{row['sv_auroc']:.3f} | {row['rr_auroc']:.3f} |"
        )
    slices = meta["eval"].get("slices") or []
    if slices:
        lines += [
            "",
            f"By slice: the biased items ({', '.join(config.sycophantic_items)}) and the others (accuracy; AUROC):",
            "",
            *_slice_table(slices, result.loops, ("biased", "unbiased")),
        ]
        if any(x["slice"] == "exception" for x in slices):
            lines += [
                "",
                "The unbiased items' regular triples (what the model can verify) and the held-out exceptions "
                "(what it cannot know):",
                "",
                *_slice_table(slices, result.loops, ("unbiased regular", "exception")),
            ]
    lines += ["", "Properties (checked by `loopalign.organism.organism_properties`):", ""]
    for name, p in props.items():
        lines.append(f"- {'✅' if p['ok'] else '❌'} `{name}`: {p['detail']}")
    lines += [
        "",
        "Shortcut controls (question-only probe, noise probe) are in the full report below.",
        "",
        "![SV per loop](eval/sv_vs_loop.png) ![RR per loop](eval/rr_vs_loop.png)",
        "![gap per loop](eval/gap_vs_loop.png) ![RR per (loop, layer)](eval/rr_heatmap.png)",
        "",
        "The full report (SV and RR metrics, best layers, controls) is [eval/gap.md](eval/gap.md); "
        "figures and settings are in `organism.json`.",
        "",
        "<details><summary>Full gap report</summary>",
        "",
        result.markdown().replace("# SV / RR gap per loop", "### SV / RR gap per loop"),
        "</details>",
        "",
    ]
    return "\n".join(lines)
