"""Rates of graded introspection trials: Wilson intervals, differences, the per-cell / per-loop summary.

Detection = coherent detection claims on injection trials; identification = successes on injection
trials; false positive = detection claims (coherent or not) on control trials of the same loop count;
leakage = the concept named without a detection claim (steering, not introspection).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..metrics import wilson_interval
from .grading import named_concepts

__all__ = [
    "summarize",
    "rate_grids",
    "RESULT_RULE",
    "SPECIFICITY_RULE",
    "positive_control_verdict",
    "specificity_verdict",
    "naming_rate",
]


def _rate(values, n_boot: int, alpha: float, seed: int) -> dict:
    """A rate of 0/1 outcomes with its Wilson interval (``n_boot`` and ``seed`` are unused: kept for
    the callers; a percentile bootstrap gave [0, 0] at 0 successes)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"rate": None, "lo": None, "hi": None, "n": 0}
    k = int(round(float(v.sum())))
    lo, hi = wilson_interval(k, int(v.size), alpha)
    return {"rate": float(v.mean()), "lo": float(lo), "hi": float(hi), "n": int(v.size)}


def _difference(a: dict, b: dict, alpha: float) -> dict:
    """a − b of two independent rates with Newcombe's hybrid score interval (from their Wilson
    intervals); None parts when either rate is missing."""
    if not a or not b or a.get("rate") is None or b.get("rate") is None:
        return {"rate": None, "lo": None, "hi": None}
    p1, l1, u1 = a["rate"], a["lo"], a["hi"]
    p2, l2, u2 = b["rate"], b["lo"], b["hi"]
    d = p1 - p2
    lo = d - ((p1 - l1) ** 2 + (u2 - p2) ** 2) ** 0.5
    hi = d + ((u1 - p1) ** 2 + (p2 - l2) ** 2) ** 0.5
    return {"rate": d, "lo": max(-1.0, lo), "hi": min(1.0, hi)}


def summarize(records: Sequence[dict], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Rates with intervals from graded records (trial fields + ``grade`` dict). Returns a dict with
    ``cells``, ``controls``, ``random``, ``control_questions``, ``by_injection_loop``, ``heatmaps``
    (identification over extraction x injection loop) and ``grids`` (:func:`rate_grids`)."""
    by: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        g, kind, n = r["grade"], r["trial_type"], int(r["num_loops"])
        site = (n, int(r["extraction_loop"]), int(r["injection_loop"]), int(r["layer"]))
        if kind == "injection":
            by["cells"][(*site, float(r["strength"]))].append(g)
            by["loop"][(n, int(r["injection_loop"]))].append(g)
            by["heat"][(n, int(r["extraction_loop"]), int(r["injection_loop"]))].append(g)
            by["loop_strength"][(n, int(r["injection_loop"]), float(r["strength"]))].append(g)
            by["layer_loop"][(n, int(r["layer"]), int(r["injection_loop"]))].append(g)
        elif kind == "control":
            by["controls"][(n,)].append(g)
        elif kind == "random":
            by["random"][(*site, float(r["strength"]))].append(g)
            by["random_loop_strength"][(n, int(r["injection_loop"]), float(r["strength"]))].append(g)
        elif kind == "control_question":
            by["questions"][(*site, float(r["strength"]))].append(g)

    def det(g):
        return float(g["detected"] and not g["incoherent"])

    def succ(g):
        return float(g["success"])

    def rates(gs, **names):
        return {k: _rate([f(g) for g in gs], n_boot, alpha, seed) for k, f in names.items()}

    inc = lambda g: float(g["incoherent"])  # noqa: E731
    # steering leakage: the concept shows up in the text without a detection claim
    leak = lambda g: float(bool(g.get("mentions_concept")) and not g["detected"])  # noqa: E731
    claim = lambda g: float(g["detected"])  # noqa: E731
    keys = ("num_loops", "extraction_loop", "injection_loop", "layer", "strength")
    fp = {k[0]: rates(gs, false_positive=claim, incoherent=inc) for k, gs in sorted(by["controls"].items())}
    out = {
        "cells": [
            {**dict(zip(keys, k)), **rates(gs, detection=det, identification=succ, incoherent=inc)}
            for k, gs in sorted(by["cells"].items())
        ],
        "controls": [{"num_loops": n, **v} for n, v in fp.items()],
        "random": [
            {**dict(zip(keys, k)), **rates(gs, detection=claim, incoherent=inc)}
            for k, gs in sorted(by["random"].items())
        ],
        "control_questions": [
            {**dict(zip(keys, k)), **rates(gs, yes=claim, incoherent=inc)} for k, gs in sorted(by["questions"].items())
        ],
        "by_injection_loop": [],
        "heatmaps": {},
    }
    loop_counts = sorted({k[0] for k in by["loop"]} | set(fp))
    for n in loop_counts:
        loops = sorted({k[1] for k in by["loop"] if k[0] == n})
        for t in loops:
            row = {"num_loops": n, "injection_loop": t}
            row.update(rates(by["loop"][(n, t)], detection=det, identification=succ, incoherent=inc, leakage=leak))
            row["false_positive"] = fp.get(n, {}).get("false_positive", _rate([], n_boot, alpha, seed))
            row["detection_minus_fp"] = _difference(row["detection"], row["false_positive"], alpha)
            out["by_injection_loop"].append(row)
        if not loops and n in fp:
            out["by_injection_loop"].append(
                {"num_loops": n, "injection_loop": None, **{"false_positive": fp[n]["false_positive"]}}
            )
        ext = sorted({k[1] for k in by["heat"] if k[0] == n})
        inj = sorted({k[2] for k in by["heat"] if k[0] == n})
        if ext and inj:
            heat = {"identification": [], "detection": [], "n": []}
            for ti in inj:
                row_i, row_d, row_n = [], [], []
                for te in ext:
                    gs = by["heat"].get((n, te, ti), [])
                    row_i.append(float(np.mean([succ(g) for g in gs])) if gs else None)
                    row_d.append(float(np.mean([det(g) for g in gs])) if gs else None)
                    row_n.append(len(gs))
                heat["identification"].append(row_i)
                heat["detection"].append(row_d)
                heat["n"].append(row_n)
            out["heatmaps"][str(n)] = {"extraction_loops": ext, "injection_loops": inj, **heat}
    out["grids"] = rate_grids(by, fp, alpha)
    return out


def _grid(groups: dict[tuple, list[dict]], n: int, rows: list, cols: list, rate_fns: dict, alpha: float) -> dict:
    """{"rows", "cols", metric: [[rate dict per col] per row]} of the groups keyed (n, row, col)."""
    grid = {"rows": rows, "cols": cols}
    for name, f in rate_fns.items():
        grid[name] = [[_rate([f(g) for g in groups.get((n, r, c), [])], 0, alpha, 0) for c in cols] for r in rows]
    return grid


def rate_grids(by: dict, fp: dict, alpha: float) -> dict:
    """Per total loop count N (keys ``str(N)``), pooled over concepts and the other axes, each cell a rate
    with its Wilson interval and n:

    - ``loop_strength``: detection and identification, rows = injection loop, cols = strength;
    - ``layer_loop``: detection and identification, rows = layer, cols = injection loop;
    - ``random_loop_strength``: detection claims on random-vector trials, rows = injection loop, cols = strength;
    - ``false_positive``: the N's control rate (the flat line the curves are read against).
    """

    def det(g):
        return float(g["detected"] and not g["incoherent"])

    def succ(g):
        return float(g["success"])

    def claim(g):
        return float(g["detected"])

    out = {}
    ns = sorted({k[0] for k in by["loop_strength"]} | {k[0] for k in by["random_loop_strength"]})
    for n in ns:
        ls = by["loop_strength"]
        loops = sorted({k[1] for k in ls if k[0] == n} | {k[1] for k in by["random_loop_strength"] if k[0] == n})
        strengths = sorted({k[2] for k in ls if k[0] == n} | {k[2] for k in by["random_loop_strength"] if k[0] == n})
        layers = sorted({k[1] for k in by["layer_loop"] if k[0] == n})
        inj = sorted({k[2] for k in by["layer_loop"] if k[0] == n})
        out[str(n)] = {
            "loop_strength": _grid(ls, n, loops, strengths, {"detection": det, "identification": succ}, alpha),
            "layer_loop": _grid(by["layer_loop"], n, layers, inj, {"detection": det, "identification": succ}, alpha),
            "random_loop_strength": _grid(by["random_loop_strength"], n, loops, strengths, {"detection": claim}, alpha),
            "false_positive": fp.get(n, {}).get("false_positive", _rate([], 0, alpha, 0)),
        }
    return out


#: the positive control's bar, stated before any run (docs/introspection.md)
RESULT_RULE = (
    "at the trained injection site (the model's last loop), on concepts held out from training, pooled over "
    "strengths: (1) the 95% lower bound (Newcombe) of detection minus the controls' false-positive rate is above 0, "
    "and (2) the 95% Wilson lower bound of identification is above chance, 1/K for K concept words the model "
    "could name"
)


def positive_control_verdict(summary: dict, injection_loop: int, num_loops: int, n_concept_words: int) -> dict:
    """Whether a summary clears :data:`RESULT_RULE` at (``num_loops``, ``injection_loop``): the two rates with
    their intervals, the chance rate 1/``n_concept_words``, random-vector claims at that loop, and ``holds``."""
    row = next(
        (
            r
            for r in summary["by_injection_loop"]
            if (r["num_loops"], r["injection_loop"]) == (num_loops, injection_loop)
        ),
        None,
    )
    if row is None:
        raise ValueError(f"no injection trials at N = {num_loops}, injection loop {injection_loop}")
    chance = 1.0 / n_concept_words
    diff, ident = row["detection_minus_fp"], row["identification"]
    rand = [g for r in summary["random"] if (r["num_loops"], r["injection_loop"]) == (num_loops, injection_loop)
            for g in [r["detection"]]]  # fmt: skip
    k = sum(round(r["rate"] * r["n"]) for r in rand if r["rate"] is not None)
    n = sum(r["n"] for r in rand)
    detection_holds = diff["lo"] is not None and diff["lo"] > 0
    identification_holds = ident["lo"] is not None and ident["lo"] > chance
    return {
        "num_loops": num_loops,
        "injection_loop": injection_loop,
        "detection": row["detection"],
        "false_positive": row["false_positive"],
        "detection_minus_fp": diff,
        "identification": ident,
        "chance_identification": chance,
        "random_detection": _rate([1.0] * k + [0.0] * (n - k), 0, 0.05, 0),
        "detection_holds": detection_holds,
        "identification_holds": identification_holds,
        "holds": detection_holds and identification_holds,
        "rule": RESULT_RULE,
    }


def naming_rate(records: Sequence[dict], concepts: Sequence[str], injection_loop: int, num_loops: int) -> dict:
    """Rate (Wilson interval) of injection trials at (``num_loops``, ``injection_loop``) whose response names any of
    ``concepts`` (e.g. the trained ones, on held-out trials: the rate of answering with a learnt word)."""
    hits = [
        float(bool(named_concepts(" ".join(r["response"].lower().split()), concepts)))
        for r in records
        if r["trial_type"] == "injection"
        and (int(r["num_loops"]), int(r["injection_loop"])) == (num_loops, injection_loop)
    ]
    return _rate(hits, 0, 0.05, 0)


#: the positive control's bar from [introspection-v3] on, stated before any run (docs/introspection.md): detection
#: counts only as far as it is concept-specific, and intervals resample concepts, not trials
SPECIFICITY_RULE = (
    "at the trained injection site (N, the model's last loop), on concepts held out from training, pooled over "
    "strengths, with 95% percentile intervals from a bootstrap that resamples concepts (injection trials and "
    "injected control questions), random vectors, controls and uninjected control questions: (1) concept-specific "
    "detection: the lower bound of detection minus random-vector claims minus control-question drift toward 'yes' "
    "(the 'yes' rate with a concept injected minus without, where positive) is above 0; (2) the lower bound of "
    "detection minus the controls' claims is above 0; (3) the lower bound of identification is above chance, 1/K "
    "for K concept words. Without random-vector or control-question trials, (1) cannot hold"
)


def _at_site(records: Sequence[dict], kind: str, num_loops: int, injection_loop: int | None) -> list[dict]:
    return [
        r
        for r in records
        if r["trial_type"] == kind
        and int(r["num_loops"]) == num_loops
        and (injection_loop is None or int(r["injection_loop"]) == injection_loop)
    ]


def _clusters(records: Sequence[dict], value, by_concept: bool) -> list[np.ndarray]:
    """Per cluster the 0/1 values of its trials: a concept's trials together, or each trial alone."""
    groups: dict = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.get("concept") if by_concept else i].append(value(r["grade"]))
    return [np.asarray(v, dtype=np.float64) for v in groups.values()]


def _resampled_rate(clusters: list[np.ndarray], rng: np.random.Generator | None) -> float:
    """The pooled rate of the clusters, or of a resample of them with replacement (``rng``)."""
    if not clusters:
        return float("nan")
    picked = clusters if rng is None else [clusters[i] for i in rng.integers(0, len(clusters), len(clusters))]
    return float(np.concatenate(picked).mean())


def specificity_verdict(
    records: Sequence[dict],
    injection_loop: int,
    num_loops: int,
    n_concept_words: int,
    n_boot: int = 2000,
    seed: int = 0,
    extraction_loops: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
) -> dict:
    """Whether graded ``records`` clear :data:`SPECIFICITY_RULE` at (``num_loops``, ``injection_loop``): each part
    with its point estimate and concept-clustered 95% interval, the trial and cluster counts, and ``holds``.
    ``extraction_loops`` / ``layers``: the trained site's (the injected trials elsewhere are left out); None pools
    over every one evaluated, and the verdict says so."""
    if n_boot < 100:
        raise ValueError(f"specificity_verdict: n_boot must be >= 100, got {n_boot}")

    ext_set = None if extraction_loops is None else {int(t) for t in extraction_loops}
    layer_set = None if layers is None else {int(j) for j in layers}

    def trained_site(r: dict) -> bool:
        return (ext_set is None or int(r["extraction_loop"]) in ext_set) and (
            layer_set is None or int(r["layer"]) in layer_set
        )

    records = [r for r in records if not r.get("injected", r["trial_type"] != "control") or trained_site(r)]
    injected = _at_site(records, "injection", num_loops, injection_loop)
    if not injected:
        raise ValueError(f"no injection trials at N = {num_loops}, injection loop {injection_loop}")
    questions = _at_site(records, "control_question", num_loops, None)
    groups = {
        "detection": _clusters(injected, lambda g: float(g["detected"] and not g["incoherent"]), True),
        "identification": _clusters(injected, lambda g: float(g["success"]), True),
        "random_claims": _clusters(
            _at_site(records, "random", num_loops, injection_loop), lambda g: float(g["detected"]), False
        ),
        "false_positive": _clusters(
            _at_site(records, "control", num_loops, None), lambda g: float(g["detected"]), False
        ),
        "question_yes_injected": _clusters(
            [r for r in questions if r.get("injected") and int(r["injection_loop"]) == injection_loop],
            lambda g: float(g.get("answer") == "yes"),
            True,
        ),
        "question_yes_uninjected": _clusters(
            [r for r in questions if not r.get("injected")], lambda g: float(g.get("answer") == "yes"), False
        ),
    }

    def parts(rng):
        rate = {k: _resampled_rate(v, rng) for k, v in groups.items()}
        drift = rate["question_yes_injected"] - rate["question_yes_uninjected"]
        return {
            # drift toward "yes" only: a concept that makes the model answer "no" more often earns no detection
            "specific_detection": rate["detection"] - rate["random_claims"] - max(drift, 0.0),
            "detection_minus_fp": rate["detection"] - rate["false_positive"],
            "identification": rate["identification"],
            "question_drift": drift,
            **rate,
        }

    point = parts(None)
    rng = np.random.default_rng(seed)
    draws = [parts(rng) for _ in range(n_boot)]
    out = {}
    for name, value in point.items():
        values = np.asarray([d[name] for d in draws], dtype=np.float64)
        lo, hi = (None, None) if np.isnan(values).all() else np.nanpercentile(values, [2.5, 97.5]).tolist()
        out[name] = {"rate": None if np.isnan(value) else value, "lo": lo, "hi": hi}
    chance = 1.0 / n_concept_words
    has_negatives = (
        bool(groups["random_claims"])
        and bool(groups["question_yes_injected"])
        and bool(groups["question_yes_uninjected"])
    )
    specific = has_negatives and out["specific_detection"]["lo"] is not None and out["specific_detection"]["lo"] > 0
    beyond_fp = out["detection_minus_fp"]["lo"] is not None and out["detection_minus_fp"]["lo"] > 0
    identified = out["identification"]["lo"] is not None and out["identification"]["lo"] > chance
    return {
        "num_loops": num_loops,
        "injection_loop": injection_loop,
        "extraction_loops": None if extraction_loops is None else sorted(extraction_loops),
        "layers": None if layers is None else sorted(layers),
        **out,
        "chance_identification": chance,
        "n": {k: int(sum(len(c) for c in v)) for k, v in groups.items()},
        "clusters": {k: len(v) for k, v in groups.items()},
        "specific_holds": specific,
        "beyond_fp_holds": beyond_fp,
        "identification_holds": identified,
        "holds": specific and beyond_fp and identified,
        "missing": [] if has_negatives else ["random-vector or control-question trials: (1) cannot hold"],
        "rule": SPECIFICITY_RULE,
        "n_boot": n_boot,
    }
