"""Reports of an introspection evaluation: markdown tables, heatmaps, before/after comparison, W&B."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from loopalign.io import atomic_write, atomic_write_text

__all__ = [
    "IntrospectionResult",
    "compare_introspection",
    "format_rate",
    "grid_markdown",
    "plot_rate_grids",
    "plot_strength_curves",
    "plot_comparison",
    "specificity_markdown",
]


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_rate(r: dict | None) -> str:
    """A rate dict as "rate [lo, hi]" in % ("–" when empty)."""
    if not r or r.get("rate") is None:
        return "–"
    return f"{_pct(r['rate'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]"


def _site(values) -> str:
    return "pooled" if values is None else ",".join(str(v) for v in values)


def specificity_markdown(verdicts) -> str:
    """Markdown: the concept-specific result rule and, per ``(label, specificity_verdict)``, its parts with their
    concept-clustered intervals, the trial and concept counts and whether it holds."""
    lines = [
        f"Result rule (concept-specific): {verdicts[0][1]['rule']}." if verdicts else "",
        "",
        "| | specific detection | detection − FP | detection | random-vector claims | control-question drift "
        "| identification (chance) | trials (concepts) | holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, v in verdicts:
        n, k = v["n"], v["clusters"]
        holds = "yes" if v["holds"] else "no"
        parts = [("1", v["specific_holds"]), ("2", v["beyond_fp_holds"]), ("3", v["identification_holds"])]
        failed = ", ".join(p for p, ok in parts if not ok)
        lines.append(
            f"| {label} (N = {v['num_loops']}, inj loop {v['injection_loop']}, ext {_site(v.get('extraction_loops'))}, "
            f"layers {_site(v.get('layers'))}) | {format_rate(v['specific_detection'])} "
            f"| {format_rate(v['detection_minus_fp'])} | {format_rate(v['detection'])} "
            f"| {format_rate(v['random_claims'])} (n {n['random_claims']}) | {format_rate(v['question_drift'])} "
            f"(n {n['question_yes_injected']} / {n['question_yes_uninjected']}) "
            f"| {format_rate(v['identification'])} ({100 * v['chance_identification']:.1f}) "
            f"| {n['detection']} ({k['detection']}) | {holds}{f' (fails {failed})' if failed else ''} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class IntrospectionResult:
    """Graded trials (``records``), their ``summary`` (see :func:`summarize`), the config and metadata."""

    records: list[dict]
    summary: dict
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self, with_records: bool = False) -> dict:
        d = {"meta": self.meta, "config": self.config, "summary": self.summary}
        if with_records:
            d["records"] = self.records
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)

    def by_injection_loop(self) -> dict[tuple[int, int | None], dict]:
        return {(r["num_loops"], r["injection_loop"]): r for r in self.summary["by_injection_loop"]}

    def markdown(self) -> str:
        s, m = self.summary, self.meta
        alpha = self.config.get("alpha", 0.05)
        lines = [
            "# Concept-injection introspection",
            "",
            f"model: `{m.get('model', '?')}`; trials: {len(self.records)}; grader: {m.get('grader', 'rules')}; "
            f"rates in %, {int(round(100 * (1 - alpha)))}% Wilson intervals over trials. Loops and layers 0-based.",
            "",
        ]
        if self.config.get("norm_matched"):
            lines += [
                "Norm-matched injection: a strength is a fraction of the residual-stream norm at the injection "
                "site (measured on the uninjected transcript), not a multiple of the concept vector.",
                "",
            ]
        agree = m.get("agreement_with_rules")
        if agree and agree.get("n"):
            lines += [
                f"The judge agrees with the rule grader on {100 * agree['detection']:.1f}% of detections and "
                f"{100 * agree['identification']:.1f}% of identifications ({agree['n']} responses).",
                "",
            ]
        lines += [
            "## Per injection loop (pooled over extraction loops, layers, strengths, concepts)",
            "",
            "| loops N | injection loop | detection | identification | false positive (controls) | "
            "detection − false positive | leakage (concept, no claim) | incoherent | n |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["by_injection_loop"]:
            lines.append(
                f"| {r['num_loops']} | {'–' if r['injection_loop'] is None else r['injection_loop']} | "
                f"{format_rate(r.get('detection'))} | {format_rate(r.get('identification'))} | {format_rate(r.get('false_positive'))} | "
                f"{format_rate(r.get('detection_minus_fp'))} | {format_rate(r.get('leakage'))} | "
                f"{format_rate(r.get('incoherent'))} | {(r.get('detection') or {}).get('n', 0)} |"
            )
        for n, h in s["heatmaps"].items():
            lines += ["", f"## Identification heatmap, N = {n} (rows: injection loop, columns: extraction loop)", ""]
            lines += ["| inj \\ ext | " + " | ".join(map(str, h["extraction_loops"])) + " |"]
            lines += ["|---|" + "---|" * len(h["extraction_loops"])]
            for ti, row in zip(h["injection_loops"], h["identification"]):
                lines.append(f"| {ti} | " + " | ".join(_pct(v) for v in row) + " |")
        lines += grid_markdown(s.get("grids", {}))
        lines += [
            "",
            "## Cells",
            "",
            "| N | ext | inj | layer | strength | detection | identification | incoherent | n |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["cells"]:
            lines.append(
                f"| {r['num_loops']} | {r['extraction_loop']} | {r['injection_loop']} | {r['layer']} | "
                f"{r['strength']:g} | {format_rate(r['detection'])} | {format_rate(r['identification'])} | {format_rate(r['incoherent'])} | "
                f"{r['detection']['n']} |"
            )
        if s["controls"]:
            lines += [
                "",
                "## Controls (no injection)",
                "",
                "| N | false positive | incoherent | n |",
                "|---|---|---|---|",
            ]
            for r in s["controls"]:
                lines.append(
                    f"| {r['num_loops']} | {format_rate(r['false_positive'])} | {format_rate(r['incoherent'])} | "
                    f"{r['false_positive']['n']} |"
                )
        if s["random"]:
            lines += ["", "## Random norm-matched vectors", ""]
            lines += ["| N | ext | inj | layer | strength | detection claims | incoherent | n |"]
            lines += ["|---|---|---|---|---|---|---|---|"]
            for r in s["random"]:
                lines.append(
                    f"| {r['num_loops']} | {r['extraction_loop']} | {r['injection_loop']} | {r['layer']} | "
                    f"{r['strength']:g} | {format_rate(r['detection'])} | {format_rate(r['incoherent'])} | "
                    f"{r['detection']['n']} |"
                )
        if s["control_questions"]:
            lines += [
                "",
                "## 'No'-answer control questions (a 'yes' with a concept injected beyond the uninjected rate is drift)",
                "",
                "| N | injected | ext | inj | layer | strength | yes | n |",
            ]
            lines += ["|---|---|---|---|---|---|---|---|"]
            rows = sorted(s["control_questions"], key=lambda r: (r["num_loops"], r["injection_loop"] >= 0))
            for r in rows:
                site = (
                    f"yes | {r['extraction_loop']} | {r['injection_loop']} | {r['layer']} | {r['strength']:g}"
                    if r["injection_loop"] >= 0
                    else "no (uninjected) | – | – | – | –"
                )
                lines.append(f"| {r['num_loops']} | {site} | {format_rate(r['yes'])} | {r['yes']['n']} |")
        return "\n".join(lines) + "\n"

    def plot(self, out_dir: str) -> dict[str, str]:
        """identification_heatmap (extraction x injection loop), rate_heatmaps (detection and identification by
        injection loop x strength and layer x loop, cells annotated with rate, Wilson interval and n) and
        detection_vs_strength (curves per injection loop with intervals, random vectors and false positives),
        each as .png and .svg; only the figures the trials can fill."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        paths = {}
        heat = self.summary["heatmaps"]
        if heat:
            fig, axes = plt.subplots(1, len(heat), figsize=(3.2 * len(heat) + 1, 3.2), squeeze=False)
            im = None
            for ax, (n, h) in zip(axes[0], heat.items()):
                arr = np.array([[np.nan if v is None else v for v in row] for row in h["identification"]], dtype=float)
                im = ax.imshow(arr, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
                ax.set_xticks(range(len(h["extraction_loops"])), h["extraction_loops"])
                ax.set_yticks(range(len(h["injection_loops"])), h["injection_loops"])
                for yi in range(arr.shape[0]):
                    for xi in range(arr.shape[1]):
                        if not np.isnan(arr[yi, xi]):
                            ax.text(xi, yi, f"{arr[yi, xi]:.2f}", ha="center", va="center", fontsize=7, color="w")
                ax.set_xlabel("extraction loop")
                ax.set_ylabel("injection loop")
                ax.set_title(f"identification, N = {n} loops", fontsize=9)
            fig.colorbar(im, ax=list(axes[0]), label="identification rate")
            paths.update(_save_figure(fig, out_dir, "identification_heatmap"))
        grids = self.summary.get("grids", {})
        if any(g["loop_strength"]["rows"] for g in grids.values()):
            paths.update(_save_figure(plot_rate_grids(grids), out_dir, "rate_heatmaps"))
            paths.update(_save_figure(plot_strength_curves(grids), out_dir, "detection_vs_strength"))
        return paths

    def save(self, out_dir: str, plots: bool = True) -> dict[str, str]:
        """introspection.json, introspection.md, trials.jsonl (+ heatmaps), each written atomically."""
        os.makedirs(out_dir, exist_ok=True)
        trials = "".join(json.dumps(r, default=float) + "\n" for r in self.records)
        paths = {
            "introspection.json": atomic_write_text(os.path.join(out_dir, "introspection.json"), self.to_json()),
            "introspection.md": atomic_write_text(os.path.join(out_dir, "introspection.md"), self.markdown()),
            "trials.jsonl": atomic_write_text(os.path.join(out_dir, "trials.jsonl"), trials),
        }
        if plots:
            paths.update(self.plot(out_dir))
        return paths

    def log_wandb(self, run, prefix: str = "introspection/") -> None:
        """Log the per-injection-loop rates (and the heatmap images when written) to a W&B run."""
        data = {}
        for r in self.summary["by_injection_loop"]:
            tag = f"{prefix}N{r['num_loops']}/inj{r['injection_loop']}"
            for k in ("detection", "identification", "false_positive"):
                if r.get(k) and r[k].get("rate") is not None:
                    data[f"{tag}/{k}"] = r[k]["rate"]
        run.log(data)


def compare_introspection(before: IntrospectionResult, after: IntrospectionResult) -> str:
    """Markdown, before and after side by side: detection, identification, false-positive and detection − false
    positive rates per (N, injection loop) with Wilson (Newcombe for the difference) intervals, then detection
    and identification per (N, injection loop, strength) and random-vector claims per strength."""
    b, a = before.by_injection_loop(), after.by_injection_loop()
    lines = [
        "| N | inj loop | detection before | after | identification before | after | false pos. before | after | "
        "det − FP before | after | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(set(b) | set(a), key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        rb, ra = b.get(key, {}), a.get(key, {})
        cells = [format_rate(r.get(k)) for k in ("detection", "identification", "false_positive", "detection_minus_fp")
                 for r in (rb, ra)]  # fmt: skip
        n = (ra.get("detection") or rb.get("detection") or {}).get("n", 0)
        lines.append(f"| {key[0]} | {'–' if key[1] is None else key[1]} | " + " | ".join(cells) + f" | {n} |")
    gb, ga = before.summary.get("grids", {}), after.summary.get("grids", {})
    for n in [n for n in ga if n in gb]:
        lines += ["", f"Per strength, N = {n}:", ""]
        lines += ["| inj loop | strength | detection before | after | identification before | after | "
                  "random-vector claims before | after |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for grid_b, grid_a in ((gb[n], ga[n]),):
            lb, la = grid_b["loop_strength"], grid_a["loop_strength"]
            rb_, ra_ = grid_b["random_loop_strength"], grid_a["random_loop_strength"]
            for loop in la["rows"]:
                for s in la["cols"]:

                    def at(grid, metric, loop=loop, s=s):
                        if loop in grid["rows"] and s in grid["cols"] and metric in grid:
                            return grid[metric][grid["rows"].index(loop)][grid["cols"].index(s)]
                        return None

                    cells = [format_rate(at(lb, "detection")), format_rate(at(la, "detection")), format_rate(at(lb, "identification")),
                             format_rate(at(la, "identification")), format_rate(at(rb_, "detection")), format_rate(at(ra_, "detection"))]  # fmt: skip
                    lines.append(f"| {loop} | {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(r: dict | None) -> str:
    """'rate [lo, hi] n' in %, or '–' for an empty cell."""
    if not r or r.get("rate") is None:
        return "–"
    return f"{_pct(r['rate'])} [{_pct(r['lo'])}, {_pct(r['hi'])}] n={r['n']}"


def _grid_table(title: str, grid: dict, metric: str, row_name: str, col_name: str, col_fmt=str) -> list[str]:
    cols = grid["cols"]
    lines = ["", f"### {title}", "", f"| {row_name} \\ {col_name} | " + " | ".join(col_fmt(c) for c in cols) + " |"]
    lines += ["|---|" + "---|" * len(cols)]
    for r, row in zip(grid["rows"], grid[metric]):
        lines.append(f"| {r} | " + " | ".join(_cell(x) for x in row) + " |")
    return lines


def grid_markdown(grids: dict) -> list[str]:
    """Markdown tables of :func:`loopalign.eval.introspection.stats.rate_grids`: rate % [Wilson interval] and n
    per cell, for detection and identification by (injection loop x strength) and (layer x injection loop),
    random-vector detection claims by (injection loop x strength), and the controls' false-positive rate."""
    lines: list[str] = []
    for n, g in grids.items():
        lines += ["", f"## Rates by site, N = {n} (rate % [95% Wilson interval] and n per cell)"]
        lines += ["", f"False positives on controls (no injection): {_cell(g['false_positive'])}."]
        ls, ll = g["loop_strength"], g["layer_loop"]
        if ls["rows"]:
            for metric in ("detection", "identification"):
                lines += _grid_table(f"{metric.capitalize()} by injection loop x strength", ls, metric,
                                     "inj loop", "strength", lambda c: f"{c:g}")  # fmt: skip
        rs = g["random_loop_strength"]
        if rs["rows"] and any(x["n"] for row in rs["detection"] for x in row):
            lines += _grid_table("Random vectors: detection claims by injection loop x strength", rs, "detection",
                                 "inj loop", "strength", lambda c: f"{c:g}")  # fmt: skip
        if ll["rows"]:
            for metric in ("detection", "identification"):
                lines += _grid_table(f"{metric.capitalize()} by layer x injection loop", ll, metric, "layer",
                                     "inj loop")  # fmt: skip
    return lines


def _save_figure(fig, out_dir: str, stem: str) -> dict[str, str]:
    import matplotlib.pyplot as plt

    paths = {}
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        paths[f"{stem}.{ext}"] = atomic_write(
            path,
            lambda tmp, ext=ext: fig.savefig(
                tmp, format=ext, dpi=120, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None
            ),
        )
    plt.close(fig)
    return paths


def _draw_grid(ax, grid: dict, metric: str, xlabel: str, ylabel: str, title: str, col_fmt=str):
    cells = grid[metric]
    arr = np.array([[np.nan if c["rate"] is None else c["rate"] for c in row] for row in cells], dtype=float)
    im = ax.imshow(arr.reshape(len(grid["rows"]), len(grid["cols"])), origin="lower", cmap="viridis", vmin=0,
                   vmax=1, aspect="auto")  # fmt: skip
    ax.set_xticks(range(len(grid["cols"])), [col_fmt(c) for c in grid["cols"]])
    ax.set_yticks(range(len(grid["rows"])), grid["rows"])
    for yi, row in enumerate(cells):
        for xi, c in enumerate(row):
            if c["rate"] is not None:
                text = f"{c['rate']:.2f}\n[{c['lo']:.2f},{c['hi']:.2f}]\nn={c['n']}"
                ax.text(xi, yi, text, ha="center", va="center", fontsize=6,
                        color="w" if c["rate"] < 0.6 else "k")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return im


def plot_rate_grids(grids: dict, title_prefix: str = ""):
    """A figure: per N one row of panels: detection and identification by (injection loop x strength) and,
    with trials at more than one layer or loop, by (layer x injection loop). Cells: rate, Wilson interval, n."""
    import matplotlib.pyplot as plt

    panels = []
    for n, g in grids.items():
        for metric in ("detection", "identification"):
            if g["loop_strength"]["rows"]:
                panels.append((n, g["loop_strength"], metric, "strength", "injection loop", lambda c: f"{c:g}"))
        for metric in ("detection", "identification"):
            if g["layer_loop"]["rows"]:
                panels.append((n, g["layer_loop"], metric, "injection loop", "layer", str))
    cols = 4
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    im = None
    for ax, (n, grid, metric, xl, yl, fmt) in zip(axes.flat, panels):
        im = _draw_grid(ax, grid, metric, xl, yl, f"{title_prefix}{metric}, N = {n}", fmt)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), label="rate")
    return fig


def plot_strength_curves(grids: dict, title_prefix: str = ""):
    """Detection (coherent claims) vs strength, one line per injection loop with Wilson error bars; random
    vectors' claims (dashed) and the controls' false-positive rate (grey band) for reference; one panel per N."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(grids)), figsize=(4.2 * max(1, len(grids)), 3.4), squeeze=False)
    for ax, (n, g) in zip(axes[0], grids.items()):
        ls, rs = g["loop_strength"], g["random_loop_strength"]
        loops = sorted(set(ls["rows"]) | set(rs["rows"]))
        for grid, style, label in ((ls, "-o", "inj loop {}"), (rs, "--x", "random, inj loop {}")):
            for loop, row in zip(grid["rows"], grid["detection"]):
                color = f"C{loops.index(loop) % 10}"  # a loop's random-vector line shares its colour
                pts = [(s, c) for s, c in zip(grid["cols"], row) if c["rate"] is not None]
                if not pts:
                    continue
                xs = [s for s, _ in pts]
                ys = [c["rate"] for _, c in pts]
                err = [[c["rate"] - c["lo"] for _, c in pts], [c["hi"] - c["rate"] for _, c in pts]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=2, label=label.format(loop), markersize=4)
        fp = g["false_positive"]
        if fp.get("rate") is not None:
            ax.axhspan(fp["lo"], fp["hi"], color="grey", alpha=0.2)
            ax.axhline(fp["rate"], color="grey", lw=1, label="false positive (controls)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("strength")
        ax.set_ylabel("detection rate")
        ax.set_title(f"{title_prefix}detection vs strength, N = {n}", fontsize=9)
        ax.legend(fontsize=6)
    return fig


def plot_comparison(before: IntrospectionResult, after: IntrospectionResult, out_dir: str) -> dict[str, str]:
    """before_after_heatmaps and before_after_curves (.png, .svg): the same figures for the two results side by
    side (before on the left / top)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    gb, ga = before.summary.get("grids", {}), after.summary.get("grids", {})
    ns = [n for n in gb if n in ga and gb[n]["loop_strength"]["rows"] and ga[n]["loop_strength"]["rows"]]
    if not ns:
        return {}
    fig, axes = plt.subplots(2 * len(ns), 2, figsize=(8, 6.4 * len(ns)), squeeze=False)
    im = None
    for k, n in enumerate(ns):
        for j, (label, g) in enumerate((("before", gb[n]), ("after", ga[n]))):
            for i, metric in enumerate(("detection", "identification")):
                im = _draw_grid(axes[2 * k + i, j], g["loop_strength"], metric, "strength", "injection loop",
                                f"{label}: {metric}, N = {n}", lambda c: f"{c:g}")  # fmt: skip
    fig.colorbar(im, ax=list(axes.flat), label="rate")
    paths = _save_figure(fig, out_dir, "before_after_heatmaps")
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.4), squeeze=False)
    for ax, (label, grids) in zip(axes[0], (("before", gb), ("after", ga))):
        sub = plot_strength_curves({ns[0]: grids[ns[0]]}, f"{label}: ")
        src = sub.axes[0]
        for line in src.get_lines():
            ax.plot(*line.get_data(), line.get_linestyle(), marker=line.get_marker(), label=line.get_label())
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(src.get_title(), fontsize=9)
        ax.set_xlabel("strength")
        ax.set_ylabel("detection rate")
        ax.legend(fontsize=6)
        plt.close(sub)
    paths.update(_save_figure(fig, out_dir, "before_after_curves"))
    return paths
