"""Candidate answers A for problems: sampled from a policy model, or gold plus controlled wrong answers.

- :func:`controlled_candidates`: for each math problem the gold answer (label 1) and wrong answers
  (label 0) of the kinds ``off_by_k`` (gold +/- k), ``wrong_operation`` (last step with another
  operation, when the problem records its last step ``meta["last_op"]``) and ``digit_swap`` (two
  adjacent different digits swapped): a balanced set by construction.
- :func:`sample_candidates`: ``n_samples`` generations per problem from any transformers causal LM
  (an Ouro model at a chosen ``num_loops`` included), batched with left padding, labelled by
  :func:`~loopalign.data.verifiers.verify_math` (math) or :func:`~loopalign.data.verifiers.verify_safety`
  (safety prompts with ``meta["prompt_label"]``), with ``lenient="whole"``: a marked final answer or
  a bare number counts, never a number picked out of prose. A math answer cut off by ``max_new_tokens`` (no end-of-sequence token) is unparsed, never
  labelled from an intermediate number (a cut-off safety response is labelled, its meta says ``truncated``). Unparsed answers are dropped (``on_unparsed="drop"``, the
  default) or kept with ``parse_status="unparsed"`` and label 0 (``"keep"``); either way they are counted.
- :func:`balance_labels` and :func:`deduplicate` post-process record lists.
"""

from __future__ import annotations

import inspect
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from loopalign.batching import pad_token_id
from loopalign.errors import ConfigError

from .schema import Dropped, make_record
from .sources import answer_token_budget
from .sources.base import Problem
from .verifiers import Verdict, normalize_answer, normalize_number, verify_math, verify_safety

__all__ = [
    "WRONG_KINDS",
    "ControlledConfig",
    "controlled_candidates",
    "wrong_answer",
    "SamplingConfig",
    "SamplingReport",
    "sample_candidates",
    "balance_labels",
    "balance_split",
    "deduplicate",
    "deduplicate_split",
    "no_wrong_answer_reason",
]

WRONG_KINDS = ("off_by_k", "wrong_operation", "digit_swap")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_ALTERNATIVE = {"+": ("-", "*"), "-": ("+", "*"), "*": ("+", "-"), "/": ("*", "-")}


@dataclass
class ControlledConfig:
    """Gold + ``wrong_per_problem`` wrong answers of ``kinds``; off-by-k uses k in 1..``max_k``.

    ``answer_format`` renders the answer text A from the number (default: just the number).
    ``drop_without_wrong``: a problem that gets no wrong answer at all (its gold is not a plain
    number, e.g. ``1e308`` or LaTeX, or has more digits than Python converts) is dropped, gold and
    all, instead of giving a lone gold record (the default).
    """

    kinds: tuple[str, ...] = WRONG_KINDS
    wrong_per_problem: int = 1
    include_gold: bool = True
    max_k: int = 3
    answer_format: str = "{answer}"
    seed: int = 0
    drop_without_wrong: bool = False

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in WRONG_KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"ControlledConfig.kinds must be a non-empty subset of {WRONG_KINDS}, got {self.kinds}")
        if self.wrong_per_problem < 0 or self.max_k < 1:
            raise ConfigError("ControlledConfig: wrong_per_problem must be >= 0 and max_k >= 1")
        if "{answer}" not in self.answer_format:
            raise ConfigError("ControlledConfig.answer_format must contain '{answer}'")


def _fmt(value: Fraction) -> str:
    return normalize_number(
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


def wrong_answer(problem: Problem, kind: str, rng: random.Random, max_k: int = 3) -> tuple[str, dict] | None:
    """A wrong normalised answer of ``kind`` for a numeric-gold problem and its details, or None if not applicable."""
    gold = normalize_number(problem.gold)
    if gold is None:
        return None
    gold_value = Fraction(gold) if "/" not in gold else Fraction(*map(int, gold.split("/")))
    if kind == "off_by_k":
        k = rng.randint(1, max_k)
        sign = rng.choice((-1, 1)) if gold_value - k >= 0 else 1
        return _fmt(gold_value + sign * k), {"k": sign * k}
    if kind == "wrong_operation":
        last = problem.meta.get("last_op")
        if not last:
            return None
        a, op, b = last
        fa, fb = Fraction(a), Fraction(b)
        for alt in rng.sample(_ALTERNATIVE[op], 2):
            if alt == "/" and fb == 0:
                continue
            value = _OPS[alt](fa, fb)
            if value != gold_value:
                return _fmt(value), {"op": op, "wrong_op": alt}
        return None
    if kind == "digit_swap":
        text = gold.lstrip("-")
        integer = text.split(".")[0]
        spots = [
            i for i in range(len(integer) - 1) if integer[i] != integer[i + 1] and not (i == 0 and integer[1] == "0")
        ]
        if not spots:
            return None
        i = rng.choice(spots)
        swapped = integer[:i] + integer[i + 1] + integer[i] + integer[i + 2 :]
        out = ("-" if gold.startswith("-") else "") + swapped + text[len(integer) :]
        return normalize_number(out), {"position": i}
    raise ValueError(f"unknown wrong-answer kind {kind!r}; expected one of {WRONG_KINDS}")


def no_wrong_answer_reason(gold: str, kinds: tuple[str, ...] = WRONG_KINDS) -> str:
    """Why no controlled wrong answer can be made for ``gold``."""
    digits = gold.lstrip("-+")
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    if digits.isdigit() and limit and len(digits) > limit:
        return f"no wrong answer possible: the gold has {len(digits)} digits, more than Python converts ({limit})"
    if normalize_number(gold) is None:
        return f"no wrong answer possible: the gold {gold[:40]!r} is not a plain number"
    return f"no wrong answer possible: no kind of {list(kinds)} gives a value other than the gold {gold[:40]!r}"


def controlled_candidates(
    problems: list[Problem], config: ControlledConfig | None = None, dropped: list[Dropped] | None = None
) -> list[dict]:
    """Verification records: per problem the gold (label 1) and wrong answers (label 0); deterministic by seed.

    ids ``{problem.id}-gold`` and ``{problem.id}-{kind}{j}``; ``meta``: problem_id, kind and details.
    Problems whose gold is not a number only get the gold candidate, or with
    ``config.drop_without_wrong`` are dropped; either way a problem without a wrong answer is
    appended to ``dropped`` (when given) with the reason (unit "entry" when dropped, else "record":
    the wrong answer that could not be made).
    """
    cfg = config or ControlledConfig()
    out = []
    for p in problems:
        if p.scenario != "math":
            raise ValueError(f"controlled candidates need math problems; {p.id!r} is {p.scenario!r}")
        rng = random.Random(f"{cfg.seed}-{p.id}")
        base = {"problem_id": p.id, **{k: p.meta[k] for k in ("level",) if k in p.meta}}
        mine = []
        if cfg.include_gold:
            text = cfg.answer_format.format(answer=p.gold)
            mine.append(
                make_record(f"{p.id}-gold", p.task, p.gold, text, 1, p.source, "math", "ok", {**base, "kind": "gold"})
            )
        n_wrong = 0
        seen = {normalize_answer(p.gold)}
        for j in range(cfg.wrong_per_problem):
            kinds = list(cfg.kinds)
            rng.shuffle(kinds)
            if "off_by_k" in cfg.kinds:  # other kinds may be exhausted; off-by-k has several values
                kinds += ["off_by_k"] * 2 * cfg.max_k
            for kind in kinds:
                got = wrong_answer(p, kind, rng, cfg.max_k)
                if got is None or got[0] in seen:
                    continue
                value, details = got
                seen.add(value)
                text = cfg.answer_format.format(answer=value)
                verdict = verify_math(text, p.gold)
                if verdict.label != 0:  # a perturbation must never be the right answer
                    continue
                meta = {**base, "kind": kind, **details}
                mine.append(make_record(f"{p.id}-{kind}{j}", p.task, p.gold, text, 0, p.source, "math", "ok", meta))
                n_wrong += 1
                break
        if cfg.wrong_per_problem and not n_wrong:
            reason = no_wrong_answer_reason(p.gold, cfg.kinds)
            if cfg.drop_without_wrong:
                if dropped is not None:
                    dropped.append(Dropped(p.id, "entry", reason, {"id": p.id, "task": p.task, "gold": p.gold}))
                continue
            if dropped is not None:
                dropped.append(Dropped(f"{p.id}-wrong", "record", reason, {"id": p.id, "gold": p.gold}))
        out.extend(mine)
    return out


@dataclass
class SamplingConfig:
    """Sampling settings: ``n_samples`` per problem at ``temperature`` (0 = greedy, then n_samples must be 1).

    ``template`` formats the user turn from ``{task}``; ``num_loops`` is passed to looped models only
    (an error for a model whose forward has no ``num_loops``). ``on_unparsed``: "keep" or "drop".
    """

    n_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: enough for the source (sources.answer_token_budget; GSM8K 512)
    num_loops: int | None = None
    batch_size: int = 8
    seed: int = 0
    template: str = "{task}"
    system: str | None = None
    on_unparsed: str = "drop"

    def __post_init__(self):
        if self.n_samples < 1 or self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ConfigError("SamplingConfig: n_samples, batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n_samples > 1:
            raise ConfigError("SamplingConfig: temperature 0 (greedy) gives identical samples; use n_samples=1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.num_loops is not None and self.num_loops < 1:
            raise ConfigError(f"SamplingConfig.num_loops must be >= 1, got {self.num_loops}")
        if "{task}" not in self.template:
            raise ConfigError("SamplingConfig.template must contain '{task}'")
        if self.on_unparsed not in ("keep", "drop"):
            raise ConfigError(f"SamplingConfig.on_unparsed must be 'keep' or 'drop', got {self.on_unparsed!r}")


@dataclass
class SamplingReport:
    """Counts from a sampling run: generated, kept, dropped unparsed, labels and parse statuses."""

    counts: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _policy_prompt(tokenizer, task: str, cfg: SamplingConfig) -> str:
    content = cfg.template.format(task=task)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": content}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return content


def _stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's and the generation config's end-of-sequence ids."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError(
            "sample_candidates: the tokenizer and model define no end-of-sequence token, so a cut-off "
            "answer cannot be told from a finished one; set tokenizer.eos_token"
        )
    return sorted(ids)


def _accepts_num_loops(model) -> bool:
    try:
        return "num_loops" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def sample_candidates(
    model, tokenizer, problems: list[Problem], config: SamplingConfig | None = None, dropped: list | None = None
) -> tuple[list[dict], SamplingReport]:
    """Sample ``n_samples`` answers per problem and label them -> (records, report).

    Batches of ``batch_size`` problems, left padding, ``num_return_sequences=n_samples``; the seed is
    set per batch so a rerun gives the same samples. ids ``{problem.id}-s{j}``; ``meta`` records the
    policy name, num_loops, temperature and the extracted answer. Answers dropped (unparsed,
    empty) are appended to ``dropped`` (when given) as :class:`~loopalign.data.schema.Dropped` records.
    """
    cfg = config or SamplingConfig()
    gen_kwargs = {}
    budget = cfg.max_new_tokens or answer_token_budget(sorted({p.source for p in problems}))
    stop_ids = torch.tensor(_stop_token_ids(model, tokenizer))
    if cfg.num_loops is not None:
        if not _accepts_num_loops(model):
            raise ValueError(f"num_loops={cfg.num_loops} given but {type(model).__name__} is not a looped model")
        gen_kwargs["num_loops"] = cfg.num_loops
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    policy = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    report = SamplingReport()
    out: list[dict] = []
    try:
        for start in range(0, len(problems), cfg.batch_size):
            batch = problems[start : start + cfg.batch_size]
            prompts = [_policy_prompt(tokenizer, p.task, cfg) for p in batch]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(cfg.seed * 1_000_003 + start)
            sampling = (
                {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
                if cfg.temperature > 0
                else {"do_sample": False}
            )
            gen = model.generate(
                **enc,
                max_new_tokens=budget,
                num_return_sequences=cfg.n_samples,
                pad_token_id=pad_id,
                **sampling,
                **gen_kwargs,
            )
            new_tokens = gen[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for k, text in enumerate(texts):
                p, j = batch[k // cfg.n_samples], k % cfg.n_samples
                text = text.strip()
                report.counts["generated"] += 1
                truncated = not bool(torch.isin(new_tokens[k], stop_ids).any())
                report.counts["truncated"] += int(truncated)
                if p.scenario == "math" and truncated:  # cut off: the last number it holds is not its answer
                    verdict = Verdict(0, "unparsed", None)
                elif p.scenario == "math":
                    verdict = verify_math(text, p.gold, lenient="whole")
                else:
                    if p.meta.get("prompt_label") not in ("safe", "unsafe"):
                        raise ValueError(f"safety problem {p.id!r} needs meta['prompt_label'] 'safe' or 'unsafe'")
                    verdict = verify_safety(p.meta["prompt_label"] == "safe", text)
                report.counts[f"parse_status={verdict.parse_status}"] += 1
                why = None
                if verdict.parse_status == "unparsed" and cfg.on_unparsed == "drop":
                    report.counts["dropped_unparsed"] += 1
                    why = "sampled answer unparsed" + (f" (cut off at {budget} tokens)" if truncated else "")
                elif not text:
                    report.counts["dropped_empty"] += 1
                    why = "sampled answer empty"
                if why:
                    if dropped is not None:
                        dropped.append(Dropped(f"{p.id}-s{j}", "record", why, {"problem_id": p.id, "answer": text}))
                    continue
                meta = {
                    "problem_id": p.id,
                    "kind": "sampled",
                    "policy": policy,
                    "num_loops": cfg.num_loops,
                    "temperature": cfg.temperature,
                    "sample": j,
                    "extracted": verdict.extracted,
                    "truncated": truncated,
                    **({"prompt_label": p.meta["prompt_label"]} if p.scenario == "safety" else {}),
                }
                rec = make_record(
                    f"{p.id}-s{j}",
                    p.task,
                    p.gold,
                    text,
                    verdict.label,
                    p.source,
                    p.scenario,
                    verdict.parse_status,
                    meta,
                )
                out.append(rec)
                report.counts[f"label={verdict.label}"] += 1
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    report.counts["kept"] = len(out)
    report.counts["max_new_tokens"] = budget
    return out, report


def balance_split(records: list[dict], seed: int = 0, by_scenario: bool = True) -> tuple[list[dict], list[Dropped]]:
    """:func:`balance_labels` -> (kept, dropped): each dropped record with the reason it was left out."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r["scenario"] if by_scenario else "", r["label"]), []).append(i)
    keep: set[int] = set()
    why: dict[int, str] = {}
    rng = random.Random(seed)
    for scenario in sorted({k[0] for k in groups}):
        pos, neg = groups.get((scenario, 1), []), groups.get((scenario, 0), [])
        n = min(len(pos), len(neg))
        keep.update(rng.sample(pos, n))
        keep.update(rng.sample(neg, n))
        where = f"scenario {scenario}" if by_scenario else "the set"
        for label, group in ((1, pos), (0, neg)):
            reason = (
                f"--balance: {where} has no label={1 - label} records"
                if n == 0
                else f"--balance: label={label} is the majority in {where} ({len(pos)} label=1, {len(neg)} label=0)"
            )
            why.update((i, reason) for i in group)
    kept = [r for i, r in enumerate(records) if i in keep]
    dropped = [Dropped(r.get("id"), "record", why[i], r) for i, r in enumerate(records) if i not in keep]
    return kept, dropped


def balance_labels(records: list[dict], seed: int = 0, by_scenario: bool = True) -> list[dict]:
    """Down-sample the majority label (per scenario) to a 1:1 set; keeps the input order; deterministic."""
    return balance_split(records, seed, by_scenario)[0]


def deduplicate_split(records: list[dict], by: str = "text") -> tuple[list[dict], list[Dropped]]:
    """:func:`deduplicate` -> (kept, dropped): the repeats, each with the reason it was left out."""
    if by not in ("text", "extracted"):
        raise ValueError(f"deduplicate: by must be 'text' or 'extracted', got {by!r}")
    seen: set[tuple] = set()
    out, dropped = [], []
    for r in records:
        if by == "text":
            key = " ".join(r["answer"].split())
        else:
            extracted = verify_math(r["answer"], r["gold"]).extracted if r["scenario"] == "math" else None
            key = extracted if extracted is not None else " ".join(r["answer"].split())  # unparsed: by text
        k = (r["task"], key)
        if k in seen:
            dropped.append(Dropped(r.get("id"), "record", "--dedupe: repeats an answer to the same task", r))
            continue
        seen.add(k)
        out.append(r)
    return out, dropped


def deduplicate(records: list[dict], by: str = "text") -> list[dict]:
    """Drop repeated candidates of the same task: ``by="text"`` (whitespace-normalised answer text) or
    ``by="extracted"`` (the same normalised final answer). Keeps the first occurrence."""
    return deduplicate_split(records, by)[0]
