"""Shortcut controls for RR: how much of the readout a probe could get without reading the answer.

RR is a probe on the hidden state of (task, answer). It can score well by reading the answer's
correctness, or by reading the *task* (its difficulty: answers to easy tasks are mostly right) or the
*author* (which model wrote the answer). Three controls, scored on the same records with RR's own
splits, bound those shortcuts:

- **question-only** (per loop): the features of record i are the mean of RR's features (the same
  loop, the layer RR selected at that loop in that fold, RR's probe position) of the *other* records of
  the same task (``GapConfig.group_by``, default ``task``); records whose task has no other record get
  no score and are counted. The probe is fitted exactly as RR's (:func:`fit_probes`, the same L2 grid,
  train / validation / test splits, validation criterion), with one difference that keeps it
  answer-blind: it learns to predict the labels of the *other* answers of the task from their mean
  features (one row per (record, other answer) pair; L2 chosen on validation pairs), and its posterior
  is then scored against the record's own label. It never sees the record's own features or label, so
  it measures what the task (as its other answers look in the model) tells about this answer. Fitting
  it on the record's own label instead would let a probe exploit the design of controlled datasets
  (one right and one wrong answer per task: the other answer's correctness gives this one's away,
  with a learnt negative sign), a signal RR cannot see; here that artefact shows up *below* chance.
- **author** (loop-independent, where the data names who wrote each answer): the label rate of each
  author learnt on the train + validation records of each split (smoothed towards the prior; an author
  unseen there gets the prior), scored on the test records.
- **noise** (per loop): a probe on Gaussian noise features of RR's dimension, fitted exactly as RR's
  (seeded): a floor that must stay at chance on balanced labels.

Each control is reported with the headline metric, accuracy, balanced accuracy, AUROC and the number
of records it scored, next to RR on the same records. ``share`` = (control - 0.5) / (RR - 0.5),
clipped to [0, 1], is the part of RR above chance the control reaches; 0.5 is chance for accuracy on
balanced labels, balanced accuracy and AUROC (not for F1).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from loopalign.probes import fit_probes

from .features import Features, meta_json
from .gap import metric_value
from .metrics import accuracy, auroc, balanced_accuracy
from .readout import ReadoutConfig, ReadoutResult, _score, select_features

__all__ = [
    "AUTHOR_FIELDS",
    "CLOSE_TO_RR",
    "author_control",
    "control_summary",
    "evaluate_controls",
    "noise_control",
    "question_only_control",
    "record_authors",
]

#: Record fields (top level, then inside the JSON ``meta``) tried, in order, by ``author_field="auto"``.
AUTHOR_FIELDS = ("author", "source_model", "model", "policy")

#: A control within this much (2 points) of RR on its records is flagged.
CLOSE_TO_RR = 0.02

MISSING_AUTHOR = "(missing)"


def _scores(metric: str, y: np.ndarray, p: np.ndarray) -> dict:
    """Headline ``metric`` plus accuracy, balanced accuracy and AUROC of posteriors p [n] against y [n]."""
    pred = (p > 0.5).astype(np.int64)
    return {
        "metric": metric_value(metric, y, p, pred) if len(y) else float("nan"),
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "auroc": auroc(y, p),
        "n": int(len(y)),
    }


def _fit_select_score(x_tr, y_tr, x_va, y_va, x_te, config: ReadoutConfig) -> np.ndarray:
    """RR's procedure for one split: probes for the L2 grid on train, the best by ``config.select_by`` on
    validation, its posterior on test."""
    fitted = fit_probes(x_tr, torch.as_tensor(y_tr), config.l2_grid, config.fit)
    with torch.no_grad():
        scored = [(_score(y_va, p.predict_proba(x_va).numpy(), config.select_by), p) for p in fitted]
        _, probe = max(scored, key=lambda s: s[0])
        return probe.predict_proba(x_te).numpy()


def _other_pairs(groups: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (i, j) index pairs of distinct records of the same group (None = alone), each record's group
    index [N] (-1 when alone) and group sizes [G]."""
    where: dict = {}
    gidx = np.full(len(groups), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        if g is not None:
            gidx[i] = where.setdefault(g, len(where))
    sizes = np.bincount(gidx[gidx >= 0], minlength=len(where))
    valid = np.flatnonzero(gidx >= 0)
    gidx[valid[sizes[gidx[valid]] < 2]] = -1
    pi, pj = [], []
    for g in np.unique(gidx[gidx >= 0]):
        m = np.flatnonzero(gidx == g)
        ii, jj = np.meshgrid(m, m, indexing="ij")
        keep = ii != jj
        pi.append(ii[keep])
        pj.append(jj[keep])
    if not pi:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), gidx, sizes
    return np.concatenate(pi), np.concatenate(pj), gidx, sizes


def _others_mean(x: torch.Tensor, gidx: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
    """x [N, H] -> [N, H]: the mean of the other records of each record's group (zeros when alone)."""
    has = torch.as_tensor(gidx >= 0)
    g = torch.as_tensor(np.maximum(gidx, 0))
    sums = torch.zeros(len(sizes), x.shape[1], dtype=x.dtype).index_add_(0, g[has], x[has])
    n_other = torch.as_tensor(np.maximum(sizes - 1, 1), dtype=x.dtype)[g]
    return torch.where(has[:, None], (sums[g] - x) / n_other[:, None], torch.zeros_like(x))


def question_only_control(
    features: Features, readout: ReadoutResult, groups: list, config: ReadoutConfig, metric: str
) -> dict:
    """The question-only control per loop (see the module docstring). ``groups`` [N]: the task of each
    record (None = no task). Uses RR's splits and, per loop and fold, the layer RR selected there.

    -> {available, reason, n_without_others, loops: [{loop, metric, accuracy, balanced_accuracy, auroc, n,
    rr}]} where ``rr`` is RR's headline metric on the same records.
    """
    labels = np.asarray(features.labels)
    pi, pj, gidx, sizes = _other_pairs(groups)
    has = gidx >= 0
    ev = readout.eval_index
    out = {
        "available": False,
        "reason": None,
        "n_without_others": int((~has[ev]).sum()),
        "features": "mean of RR's features (same loop, RR's selected layer per fold, RR's position) of the "
        "task's other records; fitted on the other records' labels, scored on the record's own",
        "loops": [],
    }
    if not len(pi):
        out["reason"] = "no task has more than one record (or GapConfig.group_by is None)"
        return out
    prob = np.full((len(features.loops), len(labels)), np.nan)
    failed, cache = [], {}
    for fi, (train, val, test) in enumerate(readout.splits):
        in_tr, in_va = np.isin(pi, train), np.isin(pi, val)
        te = test[has[test]]
        if not len(te) or not in_tr.any() or not in_va.any() or len(set(labels[pj[in_tr]].tolist())) < 2:
            failed.append(fi)
            continue
        for ti in range(len(features.loops)):
            li = features.layers.index(readout.best_layer[ti][fi])
            if (ti, li) not in cache:
                x = select_features(features.states[ti, li], config.position).float()
                cache[ti, li] = _others_mean(x, gidx, sizes)
            x = cache[ti, li]
            prob[ti, te] = _fit_select_score(
                x[pi[in_tr]], labels[pj[in_tr]], x[pi[in_va]], labels[pj[in_va]], x[te], config
            )
    scored = ev[~np.isnan(prob[0, ev])]
    if not len(scored):
        out["reason"] = "no RR-scored record has another record of its task in a usable split"
        return out
    out["available"] = True
    if failed:
        out["reason"] = f"splits {failed} had too few tasks with several records to fit on; their records are unscored"
    y = labels[scored]
    for ti, t in enumerate(features.loops):
        row = {"loop": int(t), **_scores(metric, y, prob[ti, scored])}
        row["rr"] = _scores(metric, y, readout.prob[ti, scored])["metric"]
        out["loops"].append(row)
    out["prob"] = prob
    return out


def noise_control(features: Features, readout: ReadoutResult, config: ReadoutConfig, metric: str, seed: int = 0):
    """A probe on standard-normal features of RR's dimension, per loop (one draw per loop, seeded), fitted
    and scored exactly as RR on RR's splits. -> {loops: [{loop, metric, accuracy, balanced_accuracy, auroc,
    n, rr}], dim}."""
    labels = np.asarray(features.labels)
    dim = int(select_features(features.states[0, 0, :1], config.position).shape[-1])
    ev = readout.eval_index
    rows = []
    for ti, t in enumerate(features.loops):
        g = torch.Generator().manual_seed(int(seed) * 1000 + int(t))
        x = torch.randn(len(labels), dim, generator=g)
        prob = np.full(len(labels), np.nan)
        for train, val, test in readout.splits:
            prob[test] = _fit_select_score(x[train], labels[train], x[val], labels[val], x[test], config)
        row = {"loop": int(t), **_scores(metric, labels[ev], prob[ev])}
        row["rr"] = _scores(metric, labels[ev], readout.prob[ti, ev])["metric"]
        rows.append(row)
    return {"dim": dim, "loops": rows}


def author_control(
    authors: list | None,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    eval_index: np.ndarray,
    metric: str,
    field: str | None = None,
    smoothing: float = 1.0,
) -> dict:
    """Per-author label rate learnt on each split's train + validation records ((positives + smoothing *
    prior) / (count + smoothing), prior = their label rate; an unseen author gets the prior), scored on
    its test records. ``authors`` [N] (None: the data has no author field: not available).

    -> {available, field, reason, n_authors, n_missing, metric, accuracy, balanced_accuracy, auroc, n}.
    """
    base = {"available": False, "field": field, "reason": None, "n_authors": 0, "n_missing": 0}
    if authors is None:
        if field is None:
            base["reason"] = "off (GapConfig.author_field is None)"
        else:
            names = ", ".join(AUTHOR_FIELDS) if field == "auto" else field
            base["reason"] = f"the records name no author (no field {names}, at the top level or in meta)"
        return base
    labels = np.asarray(labels)
    authors = [MISSING_AUTHOR if a is None or a == "" else str(a) for a in authors]
    prob = np.full(len(labels), np.nan)
    for train, val, test in splits:
        fit = np.concatenate([train, val])
        prior = float(labels[fit].mean())
        pos: dict[str, float] = {}
        cnt: dict[str, int] = {}
        for i in fit:
            pos[authors[i]] = pos.get(authors[i], 0.0) + float(labels[i])
            cnt[authors[i]] = cnt.get(authors[i], 0) + 1
        rate = {a: (pos[a] + smoothing * prior) / (cnt[a] + smoothing) for a in cnt}
        prob[test] = [rate.get(authors[i], prior) for i in test]
    ev = np.asarray(eval_index)
    base.update(
        available=True,
        n_authors=len(set(authors[i] for i in ev)),
        n_missing=sum(authors[i] == MISSING_AUTHOR for i in ev),
    )
    if base["n_authors"] < 2:
        base["reason"] = "a single author: this control cannot explain anything"
    base.update(_scores(metric, labels[ev], prob[ev]))
    base["prob"] = prob
    return base


def record_authors(dataset: Iterable[dict], field: str | None = "auto") -> tuple[str | None, list | None]:
    """Who wrote each record's answer: ``field`` at the row's top level, else inside its JSON ``meta``.
    ``"auto"``: the first of :data:`AUTHOR_FIELDS` that any record has; None: off.
    -> (field used, author per record, None where a record lacks it) or (None, None) when none is found."""
    if field is None:
        return None, None
    names = AUTHOR_FIELDS if field == "auto" else (field,)
    cols = getattr(dataset, "column_names", None)
    if cols is not None:  # a datasets.Dataset: read only the columns that can hold the author
        keep = [c for c in (*names, "meta") if c in cols]
        if not keep:
            return None, None
        dataset = dataset.select_columns(keep)
    rows = []
    for row in dataset:
        meta = {}
        try:
            meta = meta_json(row)
        except (ValueError, TypeError):
            pass
        rows.append((row, meta if isinstance(meta, dict) else {}))
    for name in names:
        values = []
        for row, meta in rows:
            v = row.get(name)
            v = meta.get(name) if v is None or v == "" else v
            values.append(None if v is None or v == "" else str(v))
        if any(v is not None for v in values):
            return name, values
    return None, None


def _share(control: float | None, rr: float | None) -> float | None:
    if control is None or rr is None or np.isnan(control) or np.isnan(rr) or rr <= 0.5:
        return None
    return float(np.clip((control - 0.5) / (rr - 0.5), 0.0, 1.0))


def control_summary(controls: dict, loops: list[int]) -> list[dict]:
    """Per loop: the share of RR above chance each control reaches (on its own records), the best
    question/author control and flags. -> [{loop, share_question_only, share_author, share_noise, best,
    best_share, flags: [str]}]."""
    q = {r["loop"]: r for r in (controls.get("question_only") or {}).get("loops", [])}
    nz = {r["loop"]: r for r in (controls.get("noise") or {}).get("loops", [])}
    au = controls.get("author") or {}
    rr_all = controls.get("rr") or {}
    out = []
    for t in loops:
        row = {"loop": int(t), "rr": rr_all.get(str(t), rr_all.get(t))}
        cands = []
        if t in q:
            row["share_question_only"] = _share(q[t]["metric"], q[t]["rr"])
            cands.append(("question-only", q[t]["metric"], q[t]["rr"], row["share_question_only"]))
        if au.get("available"):
            row["share_author"] = _share(au["metric"], row["rr"])
            cands.append(("author", au["metric"], row["rr"], row["share_author"]))
        if t in nz:
            row["share_noise"] = _share(nz[t]["metric"], nz[t]["rr"])
        flags = []
        for name, value, rr, _ in cands:
            if rr is not None and rr > 0.5 + CLOSE_TO_RR and value >= rr - CLOSE_TO_RR:
                what = "question" if name == "question-only" else "author"
                flags.append(
                    f"the {name} control ({100 * value:.1f}) is within {100 * CLOSE_TO_RR:.0f} points of RR "
                    f"({100 * rr:.1f}): RR may read the {what}, not the answer"
                )
        if t in nz and nz[t]["rr"] is not None and nz[t]["metric"] >= nz[t]["rr"] - CLOSE_TO_RR:
            flags.append(
                f"RR ({100 * nz[t]['rr']:.1f}) is not above the noise-feature probe ({100 * nz[t]['metric']:.1f}): "
                "there is no readout to explain"
            )
        if t in q and q[t]["metric"] < 0.5 - 5 * CLOSE_TO_RR:
            row["note"] = (
                f"the question-only control is below chance ({100 * q[t]['metric']:.1f}): the other answers' "
                "correctness runs against this one's (e.g. one right and one wrong answer per task), which is "
                "the dataset's design, not a question shortcut"
            )
        shares = [(s, name) for name, _, _, s in cands if s is not None]
        row["best"], row["best_share"] = (max(shares)[1], max(shares)[0]) if shares else (None, None)
        row["flags"] = flags
        out.append(row)
    return out


def evaluate_controls(
    features: Features,
    readout: ReadoutResult,
    groups: list,
    config: ReadoutConfig,
    metric: str,
    authors: list | None = None,
    author_field: str | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """All three controls and their per-loop summary. -> (controls for ``GapResult.controls``,
    per-record posteriors {question_only [T][N], author [N], NaN = unscored})."""
    labels = np.asarray(features.labels)
    ev = readout.eval_index
    q = question_only_control(features, readout, groups, config, metric)
    a = author_control(authors, labels, readout.splits, ev, metric, field=author_field)
    nz = noise_control(features, readout, config, metric, seed=seed)
    rr, rr_auroc = {}, {}
    for ti, t in enumerate(features.loops):
        s = _scores(metric, labels[ev], readout.prob[ti, ev])
        rr[str(t)], rr_auroc[str(t)] = s["metric"], s["auroc"]
    probs = {"question_only": q.pop("prob", None), "author": a.pop("prob", None)}
    controls = {
        "metric": metric,
        "chance": 0.5,
        "close_to_rr": CLOSE_TO_RR,
        "rr": rr,
        "rr_auroc": rr_auroc,
        "question_only": q,
        "author": a,
        "noise": nz,
    }
    controls["summary"] = control_summary(controls, list(features.loops))
    return controls, probs
