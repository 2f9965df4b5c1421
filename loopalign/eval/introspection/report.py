"""Reports of an introspection evaluation: markdown tables, heatmaps, before/after comparison, W&B."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from loopalign.io import atomic_write_text

from ..report import atomic_write

__all__ = ["IntrospectionResult", "compare_introspection"]


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "–"
    return f"{_pct(r['rate'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]"


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
                f"{_ci(r.get('detection'))} | {_ci(r.get('identification'))} | {_ci(r.get('false_positive'))} | "
                f"{_ci(r.get('detection_minus_fp'))} | {_ci(r.get('leakage'))} | "
                f"{_ci(r.get('incoherent'))} | {(r.get('detection') or {}).get('n', 0)} |"
            )
        for n, h in s["heatmaps"].items():
            lines += ["", f"## Identification heatmap, N = {n} (rows: injection loop, columns: extraction loop)", ""]
            lines += ["| inj \\ ext | " + " | ".join(map(str, h["extraction_loops"])) + " |"]
            lines += ["|---|" + "---|" * len(h["extraction_loops"])]
            for ti, row in zip(h["injection_loops"], h["identification"]):
                lines.append(f"| {ti} | " + " | ".join(_pct(v) for v in row) + " |")
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
                f"{r['strength']:g} | {_ci(r['detection'])} | {_ci(r['identification'])} | {_ci(r['incoherent'])} | "
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
                    f"| {r['num_loops']} | {_ci(r['false_positive'])} | {_ci(r['incoherent'])} | "
                    f"{r['false_positive']['n']} |"
                )
        if s["random"]:
            lines += ["", "## Random norm-matched vectors", "", "| N | ext | inj | layer | detection claims | n |"]
            lines += ["|---|---|---|---|---|---|"]
            for r in s["random"]:
                lines.append(
                    f"| {r['num_loops']} | {r['extraction_loop']} | {r['injection_loop']} | {r['layer']} | "
                    f"{_ci(r['detection'])} | {r['detection']['n']} |"
                )
        if s["control_questions"]:
            lines += [
                "",
                "## 'No'-answer control questions (injected)",
                "",
                "| N | ext | inj | layer | strength | yes |",
            ]
            lines += ["|---|---|---|---|---|---|"]
            for r in s["control_questions"]:
                lines.append(
                    f"| {r['num_loops']} | {r['extraction_loop']} | {r['injection_loop']} | {r['layer']} | "
                    f"{r['strength']:g} | {_ci(r['yes'])} |"
                )
        return "\n".join(lines) + "\n"

    def plot(self, out_dir: str) -> dict[str, str]:
        """identification_heatmap.{png,svg}: one panel per total loop count."""
        heat = self.summary["heatmaps"]
        if not heat:
            return {}
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

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
        paths = {}
        for ext in ("png", "svg"):
            path = os.path.join(out_dir, f"identification_heatmap.{ext}")
            paths[f"identification_heatmap.{ext}"] = atomic_write(
                path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
            )
        plt.close(fig)
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
    """Markdown: detection, identification and false-positive rates per (N, injection loop), before -> after."""
    b, a = before.by_injection_loop(), after.by_injection_loop()
    lines = [
        "| N | inj loop | detection before | after | identification before | after | false pos. before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(set(b) | set(a), key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        rb, ra = b.get(key, {}), a.get(key, {})

        def p(r, k):
            return _pct((r.get(k) or {}).get("rate"))

        lines.append(
            f"| {key[0]} | {'–' if key[1] is None else key[1]} | {p(rb, 'detection')} | {p(ra, 'detection')} | "
            f"{p(rb, 'identification')} | {p(ra, 'identification')} | {p(rb, 'false_positive')} | "
            f"{p(ra, 'false_positive')} |"
        )
    return "\n".join(lines) + "\n"
