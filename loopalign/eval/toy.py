"""A small synthetic verification dataset from plain arithmetic, for tests, examples and the
``--model tiny`` recipe (a placeholder until data_builders' synthetic source is wired in).

Each record asks whether a proposed answer to "a + b" (or "a - b", "a * b") is correct; half are.
Columns follow the data_builders schema: id, task, gold, answer, label, source, scenario, meta,
prompt, input_ids, verdict_index, answer_end_index, probe_indices.
"""

from __future__ import annotations

import json
import random

__all__ = ["toy_records", "render_verification", "toy_verdict_tokens"]


def toy_verdict_tokens(tokenizer) -> tuple[str, str]:
    """("Yes", "No") when both are single tokens for this tokenizer, else (" Yes", " No")."""
    if all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in ("Yes", "No")):
        return ("Yes", "No")
    return (" Yes", " No")


QUESTION = (
    "Question: {task}\nProposed answer: {answer}\nIs the proposed answer correct? Answer with one word: Yes or No."
)


def render_verification(tokenizer, task: str, answer: str) -> dict:
    """-> prompt, input_ids, verdict_index (last prompt token), answer_end_index, probe_indices."""
    content = QUESTION.format(task=task, answer=answer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    cut = prompt.index("Proposed answer: ") + len("Proposed answer: ") + len(answer)
    prefix = tokenizer.encode(prompt[:cut], add_special_tokens=False)
    if ids[: len(prefix)] != prefix:
        raise ValueError(f"answer {answer!r}: its end does not fall on a token boundary in the prompt")
    answer_end = len(prefix) - 1
    verdict = len(ids) - 1
    return {
        "prompt": prompt,
        "input_ids": ids,
        "verdict_index": verdict,
        "answer_end_index": answer_end,
        "probe_indices": [answer_end, verdict],
    }


def toy_records(tokenizer, n: int = 64, seed: int = 0, answers_per_task: int = 2) -> list[dict]:
    """n records (n // answers_per_task tasks, each with a correct and a wrong answer when 2)."""
    rng = random.Random(seed)
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    records = []
    task_index = 0
    while len(records) < n:
        a, b = rng.randint(2, 60), rng.randint(2, 30)
        sym, fn = rng.choice(ops)
        gold = fn(a, b)
        task = f"What is {a} {sym} {b}?"
        for j in range(answers_per_task):
            if len(records) >= n:
                break
            label = int(j % 2 == 0)
            answer = str(gold) if label else str(gold + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
            rec = {
                "id": f"toy-{task_index}-{j}",
                "task": task,
                "gold": str(gold),
                "answer": answer,
                "label": label,
                "source": "toy-arithmetic",
                "scenario": "math",
                "meta": json.dumps({"a": a, "b": b, "op": sym}),
            }
            rec.update(render_verification(tokenizer, task, answer))
            records.append(rec)
        task_index += 1
    return records
