"""Reports of a gap evaluation: JSON, Markdown, plots (PNG + SVG, Agg backend) and W&B logging.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os

import numpy as np

from loopalign.io import atomic_write, atomic_write_text, folder_lock

from .metrics import TABLE_METRICS

__all__ = ["atomic_write", "controls_markdown", "gap_markdown", "compare_markdown", "plot_gap", "save_gap", "log_wandb"]


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def _ci(row: dict, name: str) -> str:
    return f"{_pct(row.get(name))} [{_pct(row.get(name + '_lo'))}, {_pct(row.get(name + '_hi'))}]"


def _signed(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:+.1f}"


def _dci(row: dict, name: str) -> str:
    """A difference with its CI, in signed points."""
    return f"{_signed(row.get(name))} [{_signed(row.get(name + '_lo'))}, {_signed(row.get(name + '_hi'))}]"


_METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auroc": "AUROC", "f1": "F1"}


def _cluster_line(meta: dict, level: int) -> str:
    c = meta.get("clusters")
    if not c:
        return f"CIs: {level}% bootstrap over records."
    line = (
        f"CIs: {level}% cluster bootstrap over tasks (field `{c.get('field')}`): {c['n_clusters']} clusters "
        f"resampled with all their records ({c['n_records']} records)."
    )
    if c.get("n_without_task"):
        line += (
            f" {c['n_without_task']} records have no task id and each form a cluster of their own "
            "(their CIs treat them as independent)."
        )
    return line


def _per_fold(choices) -> str:
    """The layer (or L2) each probe fold chose -> "1 in 3 of 5 folds, norm in 2": readable where a
    raw per-fold list ("1,norm,1,1,norm") is not. One choice (a holdout split) is shown as is."""
    from collections import Counter

    items = [str(c) for c in (choices.split(",") if isinstance(choices, str) else choices) if str(c) != ""]
    if len(items) <= 1:
        return items[0] if items else ""
    counts = Counter(items).most_common()
    first, n = counts[0]
    rest = ", ".join(f"{name} in {k}" for name, k in counts[1:])
    return f"{first} in {n} of {len(items)} folds" + (f", {rest}" if rest else "")


def gap_markdown(result) -> str:
    """The gap table (percent, 95% CIs) plus SV / RR details, as Markdown."""
    m = result.meta
    level = int(round(100 * (1 - result.config.get("alpha", 0.05))))
    lines = [f"# SV / RR gap per loop ({result.metric})", ""]
    for note in m.get("warnings") or []:
        lines += [f"> **WARNING** {note}", ""]
    bal = m.get("label_balance")
    lines += [
        f"model: `{m.get('model', '?')}`; records: {m.get('n_records', '?')} "
        f"(RR-scored: {m.get('n_eval', '?')}); SV decision: {result.config.get('sv_decision', 'forced')}; "
        + _cluster_line(m, level),
        "",
    ]
    if bal:
        lines += [
            f"Labels: {_pct(bal['positive_share'])}% label 1 (minority share {_pct(bal['minority_share'])}%; "
            f"unbalanced below {_pct(bal['min_minority_share'])}%). Headline metric: "
            f"{m.get('metric_rule', result.metric)}. Rule: with metric='auto' the headline is accuracy on "
            "balanced labels and balanced accuracy on unbalanced ones.",
            "",
        ]
    if m.get("total_ut_steps"):
        lines += [f"Trained depth: {m['total_ut_steps']} loops; loops past it are extrapolation.", ""]
    tp = {row["loop"]: row for row in (result.tp or [])}
    prior = _prior_driven(result)
    if prior and result.metric in _PRIOR_METRICS:
        lines += [
            f"The headline metric ({result.metric}) is **prior-driven** on these unbalanced labels: a predictor "
            "of the label prior scores well, so its gap is not evidence; read balanced accuracy and AUROC below.",
            "",
        ]
    every = any(row.get("rr_all_sites") is not None for row in result.table)
    trained = any(row.get("rr_train_split") is not None for row in result.table)
    header = "| loop | SV | RR | gap RR−SV | RR fixed layer |" + (" RR all sites |" if every else "")
    header += " RR train split |" if trained else ""
    header += " SV all records | valid verdicts | best layer (folds) |"
    if tp:
        header += " TP |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row, sv_all in zip(result.table, result.sv):
        cells = [
            str(row["loop"]),
            _ci(row, "sv"),
            _ci(row, "rr"),
            _ci(row, "gap"),
            _pct(row.get("rr_fixed")),
            *([_pct(row.get("rr_all_sites"))] if every else []),
            *([_pct(row.get("rr_train_split"))] if trained else []),
            _pct(sv_all.get(result.metric)),
            _pct(sv_all.get("valid_rate")),
            _per_fold(row.get("best_layer", "")),
        ]
        if tp:
            cells.append(_pct(tp[row["loop"]]["accuracy"]) if row["loop"] in tp else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if tp:
        first = next(iter(tp.values()))
        cut = ", ".join(f"loop {k}: {r['truncated']}/{r['n']}" for k, r in tp.items() if r.get("truncated"))
        lines += [
            "",
            f"TP: greedy answers to the {first['n']} distinct tasks, at most {first.get('max_new_tokens', '?')} new "
            "tokens; unparsed answers count as wrong"
            + (f"; cut off by the token budget (unparsed): {cut}." if cut else "; none was cut off by the budget."),
        ]
    lines += controls_markdown(getattr(result, "controls", None), result.metric)
    lines += _robust_tables(result)
    lines += per_layer_markdown(result)
    lines += [
        "",
        "## SV metrics (RR-scored records)",
        "",
        "| loop | acc | bal. acc | F1 | AUROC | ECE | yes rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.sv_eval:
        lines.append(
            f"| {r['loop']} | {_pct(r['accuracy'])} | {_pct(r['balanced_accuracy'])} | {_pct(r['f1'])} | "
            f"{_pct(r['auroc'])} | {_pct(r['ece'])} | {_pct(r['yes_rate'])} |"
        )
    lines += [
        "",
        "## RR metrics (test)",
        "",
        "| loop | acc | bal. acc | F1 | AUROC | best layer (folds) | L2 (folds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.rr:
        lines.append(
            f"| {r['loop']} | {_pct(r['accuracy'])} | {_pct(r['balanced_accuracy'])} | {_pct(r['f1'])} | "
            f"{_pct(r['auroc'])} | {_per_fold(r.get('best_layer', []))} | {_per_fold([f'{c:g}' for c in r.get('best_l2', [])])} |"
        )
    if result.sv_sampled:
        lines += ["", "## Sampled verdicts", "", "| loop | acc | acc (parseable) | unparseable |", "|---|---|---|---|"]
        for r in result.sv_sampled:
            lines.append(
                f"| {r['loop']} | {_pct(r['accuracy'])} | {_pct(r['accuracy_parseable'])} | {r['unparseable']}/{r['n']} |"
            )
    return "\n".join(lines) + "\n"


def controls_markdown(controls: dict | None, metric: str) -> list[str]:
    """The "Controls" section: question-only, author and noise probes next to RR, one line per loop with
    the share of RR above chance the best control reaches, and flags. Lines (empty without controls)."""
    if not controls:
        return []
    name = _METRIC_NAMES.get(controls.get("metric", metric), metric)
    q, a, nz = controls.get("question_only") or {}, controls.get("author") or {}, controls.get("noise") or {}
    ql = {r["loop"]: r for r in q.get("loops", [])}
    nl = {r["loop"]: r for r in nz.get("loops", [])}
    lines = [
        "",
        "## Controls",
        "",
        f"Can RR be explained without reading the answer? Headline metric ({name}) and AUROC, on RR's splits "
        "(out-of-fold, grouped by task). **Question-only**: a probe on the mean features of the task's *other* "
        "answers (RR's loop, layer and position), fitted on their labels and scored against this answer's "
        "label; **author**: the label rate of the answer's author; **noise**: a probe on Gaussian features of "
        "RR's dimension (must stay at chance). `RR (same)` is RR on the records the question-only control scores.",
        "",
    ]
    if not q.get("available"):
        lines.append(f"Question-only control not available: {q.get('reason')}.")
    elif q.get("n_without_others"):
        lines.append(
            f"Question-only: {q['n_without_others']} RR-scored records have no other answer to their task (unscored)."
        )
    if q.get("available") and q.get("reason"):
        lines.append(f"Question-only: {q['reason']}.")
    if a.get("available"):
        lines.append(
            f"Author control: field `{a.get('field')}`, {a.get('n_authors')} authors"
            + (f", {a['n_missing']} records without one (one group)" if a.get("n_missing") else "")
            + (f"; {a['reason']}" if a.get("reason") else "")
            + "."
        )
    else:
        lines.append(f"Author control not available: {a.get('reason') or 'no author field'}.")
    lines += [
        "",
        "| loop | RR | question-only | RR (same) | author | noise | AUROC RR | AUROC q-only | AUROC author | AUROC noise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rr = controls.get("rr") or {}
    rr_auc = controls.get("rr_auroc") or {}
    for row in controls.get("summary") or []:
        t = row["loop"]
        qr, nr = ql.get(t, {}), nl.get(t, {})
        n_q = f" (n={qr['n']})" if qr else ""
        cells = [
            str(t),
            _pct(rr.get(str(t))),
            _pct(qr.get("metric")) + n_q,
            _pct(qr.get("rr")),
            _pct(a.get("metric")) if a.get("available") else "n/a",
            _pct(nr.get("metric")),
            _pct(rr_auc.get(str(t))),
            _pct(qr.get("auroc")),
            _pct(a.get("auroc")) if a.get("available") else "n/a",
            _pct(nr.get("auroc")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in controls.get("summary") or []:
        parts = []
        for key, label in (("share_question_only", "question-only"), ("share_author", "author")):
            if key in row:
                s = row[key]
                parts.append(f"{label} {'–' if s is None else f'{100 * s:.0f}%'}")
        if row.get("best") is not None:
            text = (
                f"the best control ({row['best']}) explains {100 * row['best_share']:.0f}% of RR above chance "
                f"({', '.join(parts)})"
            )
        elif row.get("rr") is not None and row["rr"] <= 0.5:
            text = "RR is at chance: nothing to explain"
        else:
            text = "no control available"
        line = f"- loop {row['loop']}: {text}."
        if row.get("note"):
            line += f" Note: {row['note']}."
        for flag in row.get("flags") or []:
            line += f" **FLAG**: {flag}."
        lines.append(line)
    return lines


#: metrics a label-prior predictor can score well with on unbalanced labels
_PRIOR_METRICS = ("accuracy", "f1")

#: the stronger yardsticks beside RR (``loopalign.eval.gap.YARDSTICKS``, the same keys): what each is, and its column
YARDSTICK_TABLES = {
    "all": ("one linear probe over every layer RR may read x both probe positions, on RR's splits", "RR all sites"),
    "train": (
        "a linear probe fitted on the training split (its layer and L2 chosen on a third of it held out), applied "
        "to every evaluated record",
        "RR train split",
    ),
}


def _prior_driven(result) -> bool:
    """The evaluated labels are unbalanced (meta ``label_balance``): accuracy there is prior-driven."""
    bal = (result.meta or {}).get("label_balance") or {}
    return bool(bal.get("unbalanced"))


def _robust_tables(result) -> list[str]:
    """Per metric (accuracy, balanced accuracy, AUROC): SV raw (0.5 rule), SV calibrated (label-fitted
    threshold), RR and both gaps, with CIs. On unbalanced labels the accuracy table is left out (it is
    prior-driven; gap.json keeps it) and a line says so."""
    rows = result.table
    if not rows or "sv_auroc" not in rows[0]:
        return []
    prior = _prior_driven(result)
    cal = "sv_cal_auroc" in rows[0]
    lines = [
        "",
        "## Threshold-free and balance-robust figures (RR-scored records)",
        "",
        "SV raw: P(yes) > 0.5. SV calibrated: a cut on P(yes) fitted on the labels of RR's train splits (same "
        "splits, out-of-fold). AUROC ranks SV by P(yes) (raw) or its fitted posterior (calibrated) and RR by "
        "the probe posterior. A gap that shrinks from raw to calibrated is calibration, not missing knowledge.",
    ]
    if prior:
        lines += [
            "",
            "Accuracy is left out: the labels are unbalanced, so accuracy is prior-driven (a predictor of the label "
            "prior scores well and its gap is not evidence). gap.json keeps it (`sv_accuracy`, `gap_accuracy`, ...).",
        ]
    for metric in TABLE_METRICS:
        if prior and metric in _PRIOR_METRICS:
            continue
        head = "| loop | SV raw | " + ("SV calibrated | " if cal else "") + "RR | gap RR−SV raw |"
        head += " gap RR−SV calibrated |" if cal else ""
        lines += ["", f"### {_METRIC_NAMES[metric]}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            cells = [str(r["loop"]), _ci(r, f"sv_{metric}")]
            if cal:
                cells.append(_ci(r, f"sv_cal_{metric}"))
            cells += [_ci(r, f"rr_{metric}"), _ci(r, f"gap_{metric}")]
            if cal:
                cells.append(_ci(r, f"gap_cal_{metric}"))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _loop_rows(rows: list[dict], cells) -> list[str]:
    """One markdown table row per comparison row: its loop (marked when it is in the verdict), then ``cells(row)``."""
    return [
        f"| {r['loop']}{' (verdict)' if r.get('in_verdict') else ''} | " + " | ".join(cells(r)) + " |" for r in rows
    ]


def compare_markdown(comp) -> str:
    """The before/after verdict: the rule first, then the verdict with one line per part, then per-loop
    figures (points, CIs) and TP."""
    head = (
        "| loop | SV before | SV after | RR before | RR after | SV after − RR before | RR after − SV after "
        "| dRR (refitted) | RR frozen − RR before | dSV |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)

    def cells(r):
        return [_pct(r["sv_before"]), _pct(r["sv_after"]), _pct(r["rr_before"]), _pct(r["rr_after"])] + [
            _dci(r, k) for k in ("sv_reach", "gap_after", "d_rr", "rr_drift", "d_sv")
        ]

    lines = [f"# Before / after ({comp.metric})", ""]
    if getattr(comp, "rule", ""):
        lines += [comp.rule, ""]
    parts = getattr(comp, "parts", None) or []
    verdict_lines = comp.verdict.splitlines()
    lines += [f"**{verdict_lines[0]}**", ""]
    if parts:
        lines += [f"- {p['line']}" for p in parts]
        lines += [f"- note: {n}" for n in getattr(comp, "notes", None) or []]
    else:  # a comparison written by an older version
        lines += verdict_lines[1:]
    lines.append("")
    c = getattr(comp, "clusters", None) or {}
    if c.get("n_without_task"):
        lines += [
            f"{c['n_without_task']} of {c['n_records']} records have no task id: each is a bootstrap cluster "
            "of its own.",
            "",
        ]
    if comp.metric in ("accuracy", "f1") and any("prior-driven" in n for n in getattr(comp, "notes", None) or []):
        lines += [f"The {comp.metric} columns below are prior-driven (unbalanced labels): read the AUROC table.", ""]
    lines += [head, sep] + _loop_rows(comp.rows, cells)
    if comp.rows and "sv_reach_auroc" in comp.rows[0]:
        lines += [
            "",
            "AUROC (SV by P(yes), RR by the probe posterior):",
            "",
            "| loop | SV before | SV after | RR before | RR after | SV after − RR before |",
            "|---|---|---|---|---|---|",
        ]
        lines += _loop_rows(
            comp.rows,
            lambda r: (
                [_pct(r[k]) for k in ("sv_auroc_before", "sv_auroc_after", "rr_auroc_before", "rr_auroc_after")]
                + [_dci(r, "sv_reach_auroc")]
            ),
        )
    for k, (what, column) in YARDSTICK_TABLES.items():
        first = comp.rows[0].get(f"rr_{k}_before") if comp.rows else None
        if first is None or np.isnan(first):
            continue
        lines += [
            "",
            f"A stronger yardstick beside RR (never in place of it): {what}, on the base model:",
            "",
            f"| loop | {column} before | SV after − it | its AUROC before | SV AUROC after − it |",
            "|---|---|---|---|---|",
        ]
        lines += _loop_rows(
            comp.rows,
            lambda r, k=k: (
                [_pct(r[f"rr_{k}_before"]), _dci(r, f"sv_reach_{k}")]
                + [_pct(r[f"rr_{k}_auroc_before"]), _dci(r, f"sv_reach_{k}_auroc")]
            ),
        )
    extra = getattr(comp, "extrapolation", None) or []
    if extra:
        lines += [
            "",
            f"## Extrapolation: loops past the trained depth {comp.depth} (not part of the verdict)",
            "",
            head,
            sep,
        ] + _loop_rows(extra, cells)
    tp = getattr(comp, "tp", None) or []
    if tp:
        lines += [
            "",
            f"## Task performance (greedy answers to the {tp[0]['n_tasks']} held-out tasks; paired bootstrap over "
            "the gap's task clusters)",
            "",
            "| loop | TP before | TP after | dTP |",
            "|---|---|---|---|",
        ]
        for r in tp:
            mark = " (trained depth)" if r["loop"] == comp.depth else ""
            lines.append(f"| {r['loop']}{mark} | {_pct(r['tp_before'])} | {_pct(r['tp_after'])} | {_dci(r, 'd_tp')} |")
    return "\n".join(lines) + "\n"


def per_layer_rows(result) -> tuple[list[str], list[list[float]]]:
    """RR per layer: (layer names, per loop the held-out accuracy of each layer's probe [T][L']), read from the
    result's heatmap. On a plain causal LM (one loop) this is the readout's curve over depth."""
    heat = (result.heatmap or {}).get("test") or []
    return list((result.heatmap or {}).get("layers") or []), [list(row) for row in heat]


def per_layer_markdown(result) -> list[str]:
    """The "RR per layer" section of gap.md: each layer's probe (L2 chosen on validation), scored on held-out
    records, per loop; the best layer per loop is marked."""
    layers, rows = per_layer_rows(result)
    if not layers or not rows:
        return []
    lines = [
        "",
        "## RR per layer (accuracy of each layer's probe on held-out records; * = best layer of the loop)",
        "",
        "| loop | " + " | ".join(layers) + " |",
        "|" + "---|" * (len(layers) + 1),
    ]
    for row, values in zip(result.table, rows):
        best = int(np.nanargmax(values)) if np.isfinite(np.asarray(values, dtype=float)).any() else -1
        cells = [_pct(v) + ("*" if i == best else "") for i, v in enumerate(values)]
        lines.append(f"| {row['loop']} | " + " | ".join(cells) + " |")
    return lines


def _figures(result) -> dict:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    loops = [r["loop"] for r in result.table]
    figs = {}

    def line_plot(name, keys, title, ylabel, zero=False):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, label in keys:
            y = np.array([np.nan if r[key] is None else r[key] for r in result.table], dtype=float)
            lo = np.array([np.nan if r[key + "_lo"] is None else r[key + "_lo"] for r in result.table], dtype=float)
            hi = np.array([np.nan if r[key + "_hi"] is None else r[key + "_hi"] for r in result.table], dtype=float)
            ax.plot(loops, y, marker="o", label=label)
            ax.fill_between(loops, lo, hi, alpha=0.2)
        if zero:
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("loops")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(loops)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs[name] = fig

    line_plot("sv_vs_loop", [("sv", "SV")], f"Self-verification ({result.metric})", result.metric)
    line_plot("rr_vs_loop", [("rr", "RR (best layer)")], f"Representation readout ({result.metric})", result.metric)
    line_plot("gap_vs_loop", [("gap", "RR − SV")], "Gap RR − SV", f"Δ {result.metric}", zero=True)
    heat = np.array(result.heatmap["test"], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * heat.shape[1] + 2), max(3, 0.4 * heat.shape[0] + 1.5)))
    im = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xticks(range(heat.shape[1]), result.heatmap["layers"], fontsize=7)
    ax.set_yticks(range(heat.shape[0]), loops)
    ax.set_xlabel("layer")
    ax.set_ylabel("loop")
    ax.set_title("RR test accuracy per (loop, layer)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    figs["rr_heatmap"] = fig
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * heat.shape[1] + 2), 3.5))
    for ti, t in enumerate(loops):
        ax.plot(range(heat.shape[1]), heat[ti], marker=".", label=f"loop {t}")
    ax.set_xticks(range(heat.shape[1]), result.heatmap["layers"], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("RR accuracy (held-out)")
    ax.set_title("RR per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["rr_vs_layer"] = fig
    return figs


def before_after_figure(before, after, depth: int, title: str = ""):
    """The run at a glance: TP, SV and RR per loop, before (dashed) and after (solid) training, on one 0–100% axis
    with the chance line, the trained depth marked and loops past it shaded as extrapolation, 95% cluster-bootstrap
    bands on SV and RR. A one-loop model (a plain causal LM) is drawn over its layers instead: RR per layer (each
    layer's held-out probe) before and after, SV and TP as levels. -> a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colours = {"TP": "tab:green", "SV": "tab:blue", "RR": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    one_loop = len(before.loops) == 1 and len(after.loops) == 1
    for result, style, when in ((before, "--", "before"), (after, "-", "after")):
        rows = result.table
        tp = {r["loop"]: r["accuracy"] for r in (result.tp or [])}
        if one_loop:
            layers, per_layer = per_layer_rows(result)
            x = np.arange(len(layers))
            if per_layer:
                ax.plot(x, 100 * np.array(per_layer[0]), style, color=colours["RR"], marker="o", label=f"RR {when}")
            ax.axhline(100 * rows[0]["sv"], ls=style, color=colours["SV"], label=f"SV {when}")
            if tp:
                ax.axhline(100 * next(iter(tp.values())), ls=style, color=colours["TP"], label=f"TP {when}")
            ax.set_xticks(x, layers, fontsize=7)
            ax.set_xlabel("layer (RR: each layer's held-out probe; SV and TP: the model's answer)")
            continue
        loops = [r["loop"] for r in rows]
        for key in ("SV", "RR"):
            k = key.lower()
            y = 100 * np.array([r[k] for r in rows], dtype=float)
            ax.plot(loops, y, style, color=colours[key], marker="o", label=f"{key} {when}", clip_on=False)
            lo = 100 * np.array([r[f"{k}_lo"] for r in rows], dtype=float)
            hi = 100 * np.array([r[f"{k}_hi"] for r in rows], dtype=float)
            ax.fill_between(loops, lo, hi, color=colours[key], alpha=0.08 if when == "before" else 0.15, lw=0)
        if tp:
            t_loops = sorted(tp)
            tp_y = [100 * tp[t] for t in t_loops]  # at 100% a line sits on the frame: drawn over it, not clipped
            ax.plot(t_loops, tp_y, style, color=colours["TP"], marker="s", label=f"TP {when}", clip_on=False)
        ax.set_xticks(loops)
        ax.set_xlabel("loops")
    if not one_loop:
        last = max(max(before.loops), max(after.loops))
        ax.axvline(depth, color="black", lw=0.8)
        ax.text(depth, 97, f" trained depth {depth}", fontsize=7, va="top")
        if last > depth:
            ax.axvspan(depth + 0.5, last + 0.5, color="grey", alpha=0.1, lw=0, label="extrapolation")
    ax.axhline(50, color="grey", lw=0.8, ls=":", label="chance (50%)")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{_METRIC_NAMES.get(before.metric, before.metric)} (%)")
    n = before.meta.get("n_eval", "?")
    bands = "" if one_loop else "; bands: 95% cluster-bootstrap CIs"
    ax.set_title((title + "\n" if title else "") + f"before (dashed) and after (solid); n = {n} held-out records"
                 + bands, fontsize=8)  # fmt: skip
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    return fig


def save_figure(fig, out_dir: str, name: str) -> dict[str, str]:
    """``fig`` as ``name``.png and .svg in ``out_dir``, each written atomically, then closed. -> {file: path}."""
    import matplotlib.pyplot as plt

    paths = {}
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        paths[f"{name}.{ext}"] = atomic_write(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=120))
    plt.close(fig)
    return paths


def plot_gap(result, out_dir: str) -> dict[str, str]:
    """Write sv_vs_loop, rr_vs_loop, gap_vs_loop, rr_heatmap, rr_vs_layer as PNG and SVG. -> {name.ext: path}."""
    paths = {}
    for name, fig in _figures(result).items():
        paths.update(save_figure(fig, out_dir, name))
    return paths


def save_gap(result, out_dir: str, plots: bool = True) -> dict[str, str]:
    """gap.json + gap.md (+ plots) in out_dir, holding the folder's lock (:func:`loopalign.io.folder_lock`):
    while another process writes there, this fails at once (``FolderLockedError``). -> {name: path}."""
    with folder_lock(out_dir, "save_gap"):
        paths = {
            "gap.json": atomic_write_text(os.path.join(out_dir, "gap.json"), result.to_json()),
            "gap.md": atomic_write_text(os.path.join(out_dir, "gap.md"), result.markdown()),
        }
        if plots:
            paths.update(plot_gap(result, out_dir))
    return paths


def log_wandb(
    result,
    project: str = "loopalign",
    name: str | None = None,
    run=None,
    mode: str | None = None,
    dir: str | None = None,
    prefix: str = "gap/",
):
    """Log per-loop metrics, the gap table and the plots to W&B. Without an API key (and no
    WANDB_MODE / mode given) the run is offline. Uses ``run`` when given, else starts and finishes one."""
    import wandb

    own = run is None
    if own:
        if mode is None and not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"
        if dir is not None:  # older wandb falls back to a temporary folder when ``dir`` does not exist yet
            os.makedirs(dir, exist_ok=True)
        run = wandb.init(project=project, name=name, mode=mode, dir=dir, config={"gap": result.config})
    try:
        run.define_metric(prefix + "loop")
        run.define_metric(prefix + "*", step_metric=prefix + "loop")
        tp = {r["loop"]: r["accuracy"] for r in (result.tp or [])}
        for row in result.table:
            data = {prefix + k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
            if row["loop"] in tp:
                data[prefix + "tp"] = tp[row["loop"]]
            run.log(data)
        cols = ["loop", "sv", "sv_lo", "sv_hi", "rr", "rr_lo", "rr_hi", "gap", "gap_lo", "gap_hi", "rr_fixed"]
        cols += ["rr_all_sites", "rr_all_sites_auroc", "rr_train_split", "rr_train_split_auroc"]
        table = wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in result.table])
        layers, per_layer = per_layer_rows(result)
        if layers:
            by_layer = wandb.Table(
                columns=["loop", "layer", "rr_accuracy"],
                data=[
                    [row["loop"], name, v]
                    for row, vals in zip(result.table, per_layer)
                    for name, v in zip(layers, vals)
                ],
            )
            run.log({prefix + "rr_per_layer": by_layer})
        images = {}
        import matplotlib.pyplot as plt

        for fig_name, fig in _figures(result).items():
            images[prefix + fig_name] = wandb.Image(fig)
            plt.close(fig)
        run.log({prefix + "table": table, **images})
    finally:
        if own:
            run.finish()
    return run


#: the Comparison booleans logged to W&B: the rule's parts a-f, the overall verdict and what was measured
PART_KEYS = (
    "sv_caught_up",
    "gap_closed",
    "rr_preserved",
    "tp_kept",
    "saturated",
    "sv_past_base_readout",
    "passed",
    "frozen_readout",
    "tp_measured",
    "sv_improved",
)


def log_comparison_wandb(comparison, run, prefix: str = "compare/") -> dict:
    """Put the before/after verdict into a W&B run: the verdict quantities at the trained depth with
    their CIs, one boolean per part of the rule (``sv_caught_up`` a, ``gap_closed`` b, ``rr_preserved`` c,
    ``tp_kept`` d, ``saturated`` e, ``sv_past_base_readout`` f), ``passed`` and ``outcome``, and TP at the
    depth in the run's summary, and every loop's figures as a table. -> the summary entries written."""
    import wandb

    summary = {
        f"{prefix}depth": comparison.depth,
        f"{prefix}verdict": comparison.verdict,
        f"{prefix}outcome": comparison.outcome,
    }
    for key in PART_KEYS:
        summary[prefix + key] = bool(getattr(comparison, key))
    for k, v in comparison.summary.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            summary[prefix + k] = v
    tp = next((r for r in comparison.tp if r["loop"] == comparison.depth), None)
    if tp is not None:
        summary.update({prefix + k: tp[k] for k in ("tp_before", "tp_after", "d_tp", "d_tp_lo", "d_tp_hi")})
    run.summary.update(summary)
    rows = [*comparison.rows, *comparison.extrapolation]
    cols = (
        [c for c in rows[0] if all(isinstance(r.get(c), (int, float, bool, type(None))) for r in rows)] if rows else []
    )
    run.log({prefix + "table": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
    return summary


def short_markdown(result, path: str | None = None) -> str:
    """A compact per-loop table (SV, RR, gap with CIs, AUROC, TP) for a console; the full report is
    gap.md (``path``, when given, is named)."""
    tp = {r["loop"]: r["accuracy"] for r in (result.tp or [])}
    lines = [
        f"| loop | SV | RR | gap RR−SV | AUROC SV / RR |{' TP |' if tp else ''}",
        f"|---|---|---|---|---|{'---|' if tp else ''}",
    ]
    for row in result.table:
        auc = (
            f"{row['sv_auroc']:.3f} / {row['rr_auroc']:.3f}"
            if row.get("sv_auroc") is not None and row.get("rr_auroc") is not None
            else "–"
        )
        cells = [str(row["loop"]), _ci(row, "sv"), _ci(row, "rr"), _ci(row, "gap"), auc]
        if tp:
            cells.append(_pct(tp.get(row["loop"])) if row["loop"] in tp else "–")
        lines.append("| " + " | ".join(cells) + " |")
    warnings = (result.meta or {}).get("warnings") or []
    lines += [f"warning: {w}" for w in warnings]
    if path:
        lines.append(f"(full report: {path})")
    return "\n".join(lines)
