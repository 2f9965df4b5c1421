"""Nameability: does an injected concept vector make the model *say* its word, with no question about thoughts?

The precondition of a positive control for concept-specific introspection (issue #29 item 4): if injecting a
held-out concept's vector never makes a model name the word, no introspection training can teach it to report
*which* concept was injected, and "detection" can only be a perturbation detector. Measured greedily, before any
introspection training, in two contexts:

- ``"neutral"``: a short request for a word (:data:`NAMEABILITY_PROMPTS`; none is the trial question or a control
  question), the vector injected from the user turn's first token to the end;
- ``"trial"``: the protocol's trial transcript (:func:`loopalign.injection.trial_prompt`), injected from the
  injection start as in a trial.

Strengths are norm-matched (fractions of the residual-stream norm at the site on the uninjected prompt, as
:func:`loopalign.injection.residual_site_norms` measures it). A trial names the concept when the first vocabulary
word the reply names (:func:`loopalign.eval.introspection.grading.named_concepts`, forms and close relatives) is
the concept: "Trumpets." counts, "Towers." or "Trumpets or towers" with towers first do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loopalign.batching import pad_left, pad_token_id
from loopalign.eval.metrics import wilson_interval
from loopalign.injection import inject_rows, render_chat, residual_site_norms, trial_prompt

from .grading import named_concepts

__all__ = ["NAMEABILITY_PROMPTS", "HELD_OUT_NAMEABILITY_PROMPT", "names_word", "nameability_prompt", "nameability"]

#: neutral requests for a word (written here): the nameable organism's steering stage trains on these
NAMEABILITY_PROMPTS: tuple[str, ...] = (
    "What word is on your mind?",
    "Say one word.",
    "Name the first thing that comes to mind.",
    "What are you thinking of?",
    "Tell me something.",
)
#: a neutral request no build trains on: nameability in the "neutral" context is read on it
HELD_OUT_NAMEABILITY_PROMPT = "Which word comes to you now?"


def names_word(reply: str, word: str, vocabulary: Sequence[str]) -> bool:
    """Whether the first word of ``vocabulary`` that ``reply`` names (forms and close relatives) is ``word``."""
    named = named_concepts(reply, vocabulary)
    return bool(named) and named[0] == word


def nameability_prompt(tokenizer, text: str = HELD_OUT_NAMEABILITY_PROMPT) -> tuple[list[int], int]:
    """(input_ids, injection start) of a neutral request rendered as one user turn with the generation prompt;
    the injection covers the whole prompt (start 0)."""
    return list(
        tokenizer(render_chat(tokenizer, [{"role": "user", "content": text}]), add_special_tokens=False)["input_ids"]
    ), 0


@torch.no_grad()
def nameability(
    model,
    tokenizer,
    vectors,
    words: Sequence[str],
    loop: int,
    layer: int,
    strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    context: str = "neutral",
    vocabulary: Sequence[str] | None = None,
    num_loops: int | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> dict:
    """Greedy replies with each word's vector (extracted at (``loop``, ``layer``)) injected at that site, norm-matched
    at each strength -> {"rate", "interval" (Wilson 95%), "n", "by_strength": {strength: rate}, "context", "site",
    "examples": first replies}. ``vocabulary`` (default ``words``) is what a reply may name instead."""
    if context not in ("neutral", "trial"):
        raise ValueError(f"context must be 'neutral' or 'trial', got {context!r}")
    if not words or not strengths or any(not s > 0 for s in strengths):
        raise ValueError(f"nameability needs words and strengths > 0, got {len(words)} words, {list(strengths)}")
    vocabulary = list(vocabulary or words)
    num_loops = int(num_loops or getattr(model.config, "total_ut_steps", 1))
    if context == "trial":
        _, ids, start = trial_prompt(tokenizer)
    else:
        ids, start = nameability_prompt(tokenizer)
    site = {"input_ids": ids, "injection_start": start, "num_loops": num_loops, "injection_loop": loop, "layer": layer}
    norm = residual_site_norms(model, [site])[(num_loops, loop, layer)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = [(w, float(s)) for s in strengths for w in words]
    hits: dict[float, list[bool]] = {float(s): [] for s in strengths}
    examples = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            vecs = []
            for w, s in chunk:
                v = vectors.vector(w, loop, layer).float()
                vecs.append(s * norm * v / v.norm().clamp_min(1e-12))
            batch = pad_left([ids] * len(chunk), pad_token_id(tokenizer))
            ids_b, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with inject_rows(model, torch.stack(vecs), [loop] * len(chunk), [layer] * len(chunk), [start] * len(chunk)):
                out = model.generate(
                    input_ids=ids_b,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_token_id(tokenizer),
                )
            for (w, s), o in zip(chunk, out):
                reply = tokenizer.decode(o[ids_b.shape[1] :], skip_special_tokens=True).strip()
                hits[s].append(names_word(reply, w, vocabulary))
                if len(examples) < 8:
                    examples.append({"word": w, "strength": s, "reply": reply})
    finally:
        model.train(was_training)
    flat = [h for v in hits.values() for h in v]
    k, n = sum(flat), len(flat)
    return {
        "context": context,
        "site": {"loop": loop, "layer": layer, "num_loops": num_loops, "site_norm": norm},
        "rate": k / n,
        "interval": list(wilson_interval(k, n)),
        "n": n,
        "n_words": len(words),
        "by_strength": {f"{s:g}": sum(v) / len(v) for s, v in hits.items()},
        "examples": examples,
    }
