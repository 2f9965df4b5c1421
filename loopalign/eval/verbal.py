"""SV: self-verification. The model is asked whether answer A to task T is right; its verdict is
read from the next-token distribution at the record's verdict position, for every loop.

Forced choice: P(yes) renormalised over {yes, no}, prediction P(yes) > 0.5. Strict: the verdict is
right only when the full-vocabulary argmax is the right token (a degenerate loop whose argmax is
neither token counts as wrong, as in the published figures). Label 1 = the answer is correct = "Yes".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from loopalign.data.prompts import verdict_token_ids

from .features import EvalRecord, Features
from .metrics import binary_metrics
from .task import generate_texts

__all__ = ["verdict_token_ids", "sv_metrics", "sv_predictions", "parse_verdict", "sampled_verdicts"]


def sv_predictions(features: Features, decision: str = "forced") -> tuple[np.ndarray, np.ndarray]:
    """-> (P(yes) [T,N], predicted label [T,N]; -1 = no valid verdict under ``decision='strict'``)."""
    p_yes = features.p_yes().numpy().astype(np.float64)
    pred = (p_yes > 0.5).astype(np.int64)
    if decision == "strict":
        pred = np.where(features.verdict_valid.numpy(), pred, -1)
    elif decision != "forced":
        raise ValueError(f"unknown SV decision {decision!r}: use 'forced' or 'strict'")
    return p_yes, pred


def sv_metrics(features: Features, subset: np.ndarray | None = None, decision: str = "forced") -> list[dict]:
    """Per loop: accuracy, balanced accuracy, F1, AUROC, ECE (on P(yes)), valid-verdict rate, yes/no mass."""
    idx = np.arange(len(features.ids)) if subset is None else np.asarray(subset)
    y = features.labels[idx]
    if (y < 0).any():
        bad = features.ids[int(idx[np.argmax(y < 0)])]
        raise ValueError(f"record {bad!r}: missing field 'label', needed for SV metrics")
    p_yes, pred = sv_predictions(features, decision)
    mass = torch.logsumexp(features.verdict_logp, dim=-1).exp().numpy()
    rows = []
    for ti, t in enumerate(features.loops):
        m = binary_metrics(y, p_yes[ti, idx], pred=pred[ti, idx])
        m.update(
            loop=t,
            valid_rate=float(features.verdict_valid[ti].numpy()[idx].mean()),
            yes_no_mass=float(mass[ti, idx].mean()),
            yes_rate=float((pred[ti, idx] == 1).mean()),
        )
        rows.append(m)
    return rows


_WORD = re.compile(r"[A-Za-z]+")


def parse_verdict(text: str) -> int | None:
    """First word of text: yes/correct/true -> 1, no/incorrect/wrong/false -> 0, else None (unparseable)."""
    m = _WORD.search(text or "")
    if not m:
        return None
    word = m.group(0).lower()
    if word in ("yes", "correct", "true", "right"):
        return 1
    if word in ("no", "incorrect", "wrong", "false"):
        return 0
    return None


def sampled_verdicts(
    model,
    tokenizer,
    records: Sequence[EvalRecord],
    loops: Sequence[int],
    max_new_tokens: int = 4,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Generate the verdict text after each record's prompt (up to the verdict position) at each loop count.

    Per loop: accuracy over parseable verdicts, accuracy counting unparseable as wrong, and the
    unparseable count; plus the raw texts.
    """
    y = np.array([r.label for r in records])
    prompts = [r.input_ids[: r.verdict_index + 1] for r in records]
    rows = []
    for t in loops:
        texts = generate_texts(
            model,
            tokenizer,
            prompts,
            num_loops=t,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed,
        )
        parsed = [parse_verdict(s) for s in texts]
        ok = np.array([p is not None for p in parsed])
        pred = np.array([-1 if p is None else p for p in parsed])
        rows.append(
            {
                "loop": int(t),
                "accuracy_parseable": float(np.mean(pred[ok] == y[ok])) if ok.any() else float("nan"),
                "accuracy": float(np.mean(pred == y)),
                "unparseable": int((~ok).sum()),
                "n": len(records),
                "texts": texts,
            }
        )
    return rows
