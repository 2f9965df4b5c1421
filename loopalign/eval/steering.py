"""A training-free upper-bound baseline for the cure: steer the verbal verdict with the probe.

At inference, the probe's log-odds are added to the verdict's Yes − No logit difference:

    steered logit_t = log q_t(Yes) − log q_t(No) + alpha · logit(p_t)

with q_t the two-token verdict distribution read at loop t and p_t the RR probe's (out-of-fold)
posterior at the same loop. alpha = 1 is a product of the two experts: no parameter is fitted on
the evaluation labels. It shows how far SV could go if the words simply followed what the probe
reads; a trained cure that reaches it without the probe at inference has done the job.
"""

from __future__ import annotations

import numpy as np

from .metrics import auroc, bootstrap_ci

__all__ = ["steered_logits", "steered_sv"]


def _logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def steered_logits(sv_prob: np.ndarray, rr_prob: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """SV's Yes − No log-odds plus ``alpha`` x the probe's log-odds (same shape as the inputs)."""
    if not alpha >= 0:
        raise ValueError(f"steering: alpha must be >= 0, got {alpha}")
    return _logit(sv_prob) + alpha * _logit(rr_prob)


def steered_sv(result, alpha: float = 1.0, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per loop of a :class:`~loopalign.eval.gap.GapResult`, on its RR-scored records: SV, RR and the
    steered SV (accuracy at logit 0, with task-cluster bootstrap 95% CIs; AUROC).

    -> rows {loop, n, sv, rr, steered, steered_lo, steered_hi, sv_auroc, rr_auroc, steered_auroc, alpha}.
    """
    if not alpha >= 0:  # before any loop is read (steered_logits checks it too)
        raise ValueError(f"steered_sv: alpha must be >= 0, got {alpha}")
    _, y, ev, sv_prob, sv_pred, rr_prob = result.arrays()
    clusters = np.asarray(result.clusters(), dtype=object)
    rows = []
    for ti, loop in enumerate(result.loops):
        mask = ev & ~np.isnan(rr_prob[ti])
        if not mask.any():
            continue
        yy = y[mask]
        steered = steered_logits(sv_prob[ti][mask], rr_prob[ti][mask], alpha)
        hit = ((steered > 0).astype(np.int64) == yy).astype(np.float64)
        est, lo, hi = bootstrap_ci(
            lambda idx, hit=hit: hit[idx].mean(),
            int(mask.sum()),
            n_boot=n_boot,
            seed=seed,
            clusters=list(clusters[mask]),
        )
        rows.append(
            {
                "loop": loop,
                "n": int(mask.sum()),
                "sv": float(np.mean(sv_pred[ti][mask] == yy)),
                "rr": float(np.mean((rr_prob[ti][mask] > 0.5) == yy)),
                "steered": float(est),
                "steered_lo": float(lo),
                "steered_hi": float(hi),
                "sv_auroc": float(auroc(yy, sv_prob[ti][mask])),
                "rr_auroc": float(auroc(yy, rr_prob[ti][mask])),
                "steered_auroc": float(auroc(yy, steered)),
                "alpha": float(alpha),
            }
        )
    return rows
