"""Binary classification metrics and bootstrap intervals (numpy; N = number of records).

Every metric takes ``y`` int {0,1} [N] and either hard predictions [N] or scores/probabilities [N].
A metric that is undefined on the input (e.g. AUROC with one class) returns NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "TABLE_METRICS",
    "accuracy",
    "balanced_accuracy",
    "f1_score",
    "auroc",
    "expected_calibration_error",
    "log_loss",
    "binary_metrics",
    "bootstrap_ci",
    "cluster_members",
    "cluster_resample",
    "label_balance",
    "METRICS",
]

#: the threshold-free and threshold metrics every gap table reports beside the headline metric
TABLE_METRICS = ("accuracy", "balanced_accuracy", "auroc")


def _check(y, other, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    other = np.asarray(other)
    if y.shape != other.shape or y.ndim != 1:
        raise ValueError(f"labels and {name} must be 1-D and the same length, got {y.shape} and {other.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {sorted(set(np.unique(y).tolist()))[:5]}")
    return y.astype(np.int64), other


def accuracy(y, pred) -> float:
    """Fraction of pred [N] equal to y [N]."""
    y, pred = _check(y, pred, "predictions")
    return float(np.mean(y == pred)) if y.size else float("nan")


def balanced_accuracy(y, pred) -> float:
    """Mean of the true-positive and true-negative rates (NaN if a class is absent)."""
    y, pred = _check(y, pred, "predictions")
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return float("nan")
    return float(0.5 * (np.mean(pred[pos] == 1) + np.mean(pred[neg] == 0)))


def f1_score(y, pred) -> float:
    """F1 of the positive class (label 1); 0 when there are no true positives, NaN without positives at all."""
    y, pred = _check(y, pred, "predictions")
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    if tp + fn == 0:
        return float("nan")
    return float(2 * tp / (2 * tp + fp + fn))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [N], ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1..end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(y, score) -> float:
    """Area under the ROC curve (Mann-Whitney U; a tie between a positive and a negative counts 1/2)."""
    y, score = _check(y, score, "scores")
    score = score.astype(np.float64)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(score)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(y, prob, n_bins: int = 10) -> float:
    """ECE of the predicted class: confidence = max(p, 1-p), correct = (p > 0.5) == y.

    Equal-width bins on confidence in [0.5, 1]; sum over bins of |accuracy - mean confidence|
    weighted by the bin's share of records. prob [N] = P(label 1).
    """
    y, prob = _check(y, prob, "probabilities")
    if not y.size:
        return float("nan")
    prob = prob.astype(np.float64)
    conf = np.maximum(prob, 1 - prob)
    correct = ((prob > 0.5).astype(np.int64) == y).astype(np.float64)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def log_loss(y, prob, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of prob [N] = P(label 1)."""
    y, prob = _check(y, prob, "probabilities")
    p = np.clip(prob.astype(np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if y.size else float("nan")


def binary_metrics(y, prob, threshold: float = 0.5, pred=None) -> dict[str, float]:
    """accuracy, balanced_accuracy, f1, auroc, ece, log_loss from prob [N] = P(label 1).

    pred [N] overrides the thresholded decision (e.g. a strict verdict); scores still rank by prob.
    """
    prob = np.asarray(prob, dtype=np.float64)
    pred = (prob > threshold).astype(np.int64) if pred is None else np.asarray(pred)
    return {
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "f1": f1_score(y, pred),
        "auroc": auroc(y, prob),
        "ece": expected_calibration_error(y, prob),
        "log_loss": log_loss(y, prob),
        "n": int(len(prob)),
    }


METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc")


def label_balance(y) -> dict[str, float]:
    """Class shares of labels y [N] (0/1): positive_share, minority_share (NaN when empty) and n."""
    y = np.asarray(y)
    if not y.size:
        return {"positive_share": float("nan"), "minority_share": float("nan"), "n": 0}
    pos = float(np.mean(y == 1))
    return {"positive_share": pos, "minority_share": min(pos, 1.0 - pos), "n": int(y.size)}


def cluster_members(clusters) -> list[np.ndarray]:
    """clusters [N] (hashable ids; None = a cluster of its own) -> record indices of each cluster,
    clusters in order of first appearance."""
    where: dict = {}
    members: list[list[int]] = []
    for i, c in enumerate(clusters):
        if c is None:
            members.append([i])
            continue
        if c not in where:
            where[c] = len(members)
            members.append([])
        members[where[c]].append(i)
    return [np.asarray(m, dtype=np.int64) for m in members]


def cluster_resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One cluster-bootstrap draw: as many clusters as there are, with replacement, all their records.
    -> record indices (the length varies with the clusters drawn)."""
    picks = rng.integers(0, len(members), len(members))
    return np.concatenate([members[j] for j in picks])


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray | float],
    n: int,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    clusters=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap over N records: statistic(idx int array) -> value (scalar or array [...]).

    With ``clusters`` [N] (e.g. the task of each record; None = a record of its own) it is a cluster
    bootstrap: each draw resamples clusters with replacement and takes all their records, so records
    that share a task are never treated as independent. Returns (estimate on all records, lower,
    upper) with the (alpha/2, 1-alpha/2) percentiles; resamples on which the statistic is NaN are dropped.
    """
    if n <= 0:
        raise ValueError("bootstrap_ci needs at least one record")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    est = np.asarray(statistic(np.arange(n)), dtype=np.float64)
    if clusters is None:
        draws = (rng.integers(0, n, n) for _ in range(n_boot))
    else:
        if len(clusters) != n:
            raise ValueError(f"bootstrap_ci: clusters has {len(clusters)} entries for {n} records")
        members = cluster_members(clusters)
        draws = (cluster_resample(members, rng) for _ in range(n_boot))
    boots = np.stack([np.asarray(statistic(idx), dtype=np.float64) for idx in draws])
    with np.errstate(all="ignore"), _quiet():
        lo = np.nanpercentile(boots, 100 * alpha / 2, axis=0)
        hi = np.nanpercentile(boots, 100 * (1 - alpha / 2), axis=0)
    return est, lo, hi


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a binomial rate: (lo, hi). Unlike a percentile bootstrap it does not
    collapse at 0 or n successes (0/16 -> [0, 0.194], not [0, 0])."""
    from statistics import NormalDist

    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: {successes} successes out of {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
