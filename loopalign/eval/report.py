"""Reports of a gap evaluation: JSON, Markdown, plots (PNG + SVG, Agg backend) and W&B logging.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os

import numpy as np

from loopalign.io import atomic_write, atomic_write_text

__all__ = ["atomic_write", "gap_markdown", "compare_markdown", "plot_gap", "save_gap", "log_wandb"]


_write_text = atomic_write_text  # kept for callers of the old private name


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def _ci(row: dict, name: str) -> str:
    return f"{_pct(row.get(name))} [{_pct(row.get(name + '_lo'))}, {_pct(row.get(name + '_hi'))}]"


def gap_markdown(result) -> str:
    """The gap table (percent, 95% CIs) plus SV / RR details, as Markdown."""
    m = result.meta
    lines = [
        f"# SV / RR gap per loop ({result.metric})",
        "",
        f"model: `{m.get('model', '?')}`; records: {m.get('n_records', '?')} "
        f"(RR-scored: {m.get('n_eval', '?')}); SV decision: {result.config.get('sv_decision', 'forced')}; "
        f"CIs: {int(round(100 * (1 - result.config.get('alpha', 0.05))))}% bootstrap over records.",
        "",
    ]
    tp = {row["loop"]: row for row in (result.tp or [])}
    header = "| loop | SV | RR | gap RR−SV | RR fixed layer | SV all records | valid verdicts | best layer |"
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
            _pct(sv_all.get(result.metric)),
            _pct(sv_all.get("valid_rate")),
            str(row.get("best_layer", "")),
        ]
        if tp:
            cells.append(_pct(tp[row["loop"]]["accuracy"]) if row["loop"] in tp else "–")
        lines.append("| " + " | ".join(cells) + " |")
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
        "| loop | acc | bal. acc | F1 | AUROC | best layer | L2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.rr:
        lines.append(
            f"| {r['loop']} | {_pct(r['accuracy'])} | {_pct(r['balanced_accuracy'])} | {_pct(r['f1'])} | "
            f"{_pct(r['auroc'])} | {', '.join(map(str, r.get('best_layer', [])))} | {', '.join(f'{c:g}' for c in r.get('best_l2', []))} |"
        )
    if result.sv_sampled:
        lines += ["", "## Sampled verdicts", "", "| loop | acc | acc (parseable) | unparseable |", "|---|---|---|---|"]
        for r in result.sv_sampled:
            lines.append(
                f"| {r['loop']} | {_pct(r['accuracy'])} | {_pct(r['accuracy_parseable'])} | {r['unparseable']}/{r['n']} |"
            )
    return "\n".join(lines) + "\n"


def compare_markdown(comp) -> str:
    """The before/after verdict and per-loop deltas as Markdown."""
    lines = [
        f"# Before / after ({comp.metric})",
        "",
        f"**{comp.verdict}**",
        "",
        "| loop | SV before | SV after | dSV | RR before | RR after | dRR | gap after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in comp.rows:
        lines.append(
            f"| {r['loop']} | {_pct(r['sv_before'])} | {_pct(r['sv_after'])} | {_ci(r, 'd_sv')} | {_pct(r['rr_before'])} | "
            f"{_pct(r['rr_after'])} | {_ci(r, 'd_rr')} | {_ci(r, 'gap_after')} |"
        )
    return "\n".join(lines) + "\n"


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
    return figs


def plot_gap(result, out_dir: str) -> dict[str, str]:
    """Write sv_vs_loop, rr_vs_loop, gap_vs_loop, rr_heatmap as PNG and SVG. -> {name.ext: path}."""
    import matplotlib.pyplot as plt

    paths = {}
    for name, fig in _figures(result).items():
        for ext in ("png", "svg"):
            path = os.path.join(out_dir, f"{name}.{ext}")
            paths[f"{name}.{ext}"] = atomic_write(
                path, lambda tmp, fig=fig, ext=ext: fig.savefig(tmp, format=ext, dpi=120)
            )
        plt.close(fig)
    return paths


def save_gap(result, out_dir: str, plots: bool = True) -> dict[str, str]:
    """gap.json + gap.md (+ plots) in out_dir. -> {name: path}."""
    paths = {
        "gap.json": _write_text(os.path.join(out_dir, "gap.json"), result.to_json()),
        "gap.md": _write_text(os.path.join(out_dir, "gap.md"), result.markdown()),
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
        table = wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in result.table])
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
