"""TP: task performance. The model answers each task at k loops (batched, left padding, greedy
by default) and a verifier scores the answer against the gold answer.

A verifier is ``(answer_text, gold) -> True | False | None`` (None = unparseable), or returns an
object with ``label`` and ``parse_status`` like ``loopalign.data.verifiers.verify_math``. The default
compares the last integer in the answer with the gold's; pass ``loopalign.data.verifiers``' one
for real data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loopalign.batching import pad_left, pad_token_id
from loopalign.data.sources import answer_token_budget
from loopalign.errors import ConfigError
from loopalign.models.contract import loop_generate_kwargs

__all__ = ["TaskConfig", "generate_texts", "integer_verifier", "task_prompts", "task_performance"]

Verifier = Callable[[str, str], "bool | None"]
_INT = re.compile(r"-?\d[\d,]*")


def integer_verifier(answer_text: str, gold: str) -> bool | None:
    """Last integer in answer_text == last integer in gold; None when the answer has no integer."""
    found = _INT.findall(answer_text or "")
    gold_found = _INT.findall(str(gold))
    if not found:
        return None
    if not gold_found:
        raise ValueError(f"integer_verifier: gold {gold!r} has no integer; pass a verifier for this data")
    return int(found[-1].replace(",", "")) == int(gold_found[-1].replace(",", ""))


def _as_correct(verdict) -> int | None:
    """A verifier's output -> 1 / 0 / None (unparseable). Accepts bool/None or an object with
    ``label`` and ``parse_status`` (loopalign.data.verifiers.Verdict: "unparsed" -> None)."""
    if verdict is None:
        return None
    if hasattr(verdict, "label") and hasattr(verdict, "parse_status"):
        return None if verdict.parse_status == "unparsed" else int(bool(verdict.label))
    return int(bool(verdict))


@dataclass
class TaskConfig:
    """How TP is measured."""

    max_new_tokens: int | None = None  # new tokens per answer; None: enough for the records' sources (GSM8K 512)
    batch_size: int = 16  # prompts per generate call
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0  # when sampling
    system_prompt: str | None = None  # optional system turn
    template: str = "{task}"  # user turn; fields: task
    max_tasks: int | None = None  # cap on distinct tasks (None = all)
    seed: int = 0  # sampling seed

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"TaskConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"TaskConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise ConfigError(f"TaskConfig.temperature must be > 0, got {self.temperature}")
        if "{task}" not in self.template:
            raise ConfigError(f"TaskConfig.template must contain '{{task}}', got {self.template!r}")


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    num_loops: int,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    return_finished: bool = False,
):
    """Generate a continuation of each prompt (token ids) at ``num_loops`` loops; -> decoded new text
    per prompt, and with ``return_finished`` also whether each ended with an end-of-sequence token
    (False: cut off by ``max_new_tokens``)."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or [])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if do_sample:
        torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        enc = pad_left([list(prompts[i]) for i in batch], pad)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        if do_sample:
            kwargs["temperature"] = temperature
        kwargs.update(loop_generate_kwargs(model, num_loops))  # {} for a plain causal LM (one loop)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for j, i in enumerate(batch):
            new = out[j, ids.shape[1] :].tolist()
            texts[i] = tokenizer.decode(new, skip_special_tokens=True)
            finished[i] = any(t in stops for t in new)
    return (texts, finished) if return_finished else texts


def task_prompts(tasks: Sequence[str], tokenizer, config: TaskConfig) -> list[list[int]]:
    """Chat-formatted prompts (with the generation prompt) for each task -> token ids."""
    out = []
    for task in tasks:
        messages = [] if config.system_prompt is None else [{"role": "system", "content": config.system_prompt}]
        messages.append({"role": "user", "content": config.template.format(task=task)})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def task_performance(
    model,
    tokenizer,
    tasks: Sequence[tuple[str, str, str]],
    loops: Sequence[int],
    verifier: Verifier | None = None,
    config: TaskConfig | None = None,
    sources: Sequence[str] = (),
) -> list[dict]:
    """tasks: (task id, task text, gold). Per loop: accuracy (unparseable = wrong), unparseable count
    (truncated answers included), truncated count, n, and the ``max_new_tokens`` used.

    The budget is ``config.max_new_tokens``, else enough for the tasks' ``sources``
    (``loopalign.data.sources.answer_token_budget``: GSM8K 512, 256 when unknown). An answer cut off
    by the budget (no end-of-sequence token) is unparseable, never scored from an intermediate number.
    Each row also carries ``correct`` (1/0/None per task) and the generated ``texts``.
    """
    config = config or TaskConfig()
    budget = config.max_new_tokens or answer_token_budget(sorted(set(sources)))
    verifier = verifier or integer_verifier
    if not tasks:
        raise ValueError("task_performance: no tasks (records need non-empty 'task' and 'gold' fields)")
    for tid, text, gold in tasks:
        if not text or gold in (None, ""):
            raise ValueError(f"task {tid!r}: needs non-empty fields 'task' and 'gold' for TP")
    tasks = list(tasks)[: config.max_tasks] if config.max_tasks else list(tasks)
    prompts = task_prompts([t[1] for t in tasks], tokenizer, config)
    rows = []
    for k in loops:
        texts, finished = generate_texts(
            model,
            tokenizer,
            prompts,
            num_loops=int(k),
            max_new_tokens=budget,
            batch_size=config.batch_size,
            do_sample=config.do_sample,
            temperature=config.temperature,
            seed=config.seed,
            return_finished=True,
        )
        correct = [
            _as_correct(verifier(text, gold)) if done else None
            for text, done, (_, _, gold) in zip(texts, finished, tasks)
        ]
        rows.append(
            {
                "loop": int(k),
                "accuracy": sum(c == 1 for c in correct) / len(correct),
                "unparseable": sum(c is None for c in correct),
                "truncated": sum(not done for done in finished),
                "max_new_tokens": budget,
                "n": len(correct),
                "task_ids": [t[0] for t in tasks],
                "correct": correct,
                "texts": texts,
            }
        )
    return rows
