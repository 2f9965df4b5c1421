"""The organism's data: answer and verification sequences for training, held-out records for evaluation."""

from __future__ import annotations

import json
import random

import torch

from loopalign.batching import pad_sequences, pad_token_id
from loopalign.data.candidates import ControlledConfig, controlled_candidates
from loopalign.data.load import OrganismTasks
from loopalign.data.prompts import DEFAULT_TEMPLATE, PromptTemplate, render_records
from loopalign.data.sources.digits import digit_candidates, generate_digit_problems
from loopalign.data.sources.synthetic import generate_problems
from loopalign.data.verification import synthetic_verification_records

from .config import TASK_FAMILIES, OrganismConfig

#: the verification prompt of the digit tasks: "Ann apples 7+5 = 2" as the user turn, then the verdict
DIGITS_TEMPLATE_TEXT = "{task} = {answer}"
#: record field of a digit task's (item, a, b) triple: the unit of probe folds and bootstrap clusters
#: (tasks that differ only by name are the same arithmetic, so they are never split apart)
DIGIT_GROUP_FIELD = "triple"


def _template(tasks: str):
    return PromptTemplate(math=DIGITS_TEMPLATE_TEXT) if tasks == "digits" else DEFAULT_TEMPLATE


def _digit_problems(config: OrganismConfig, n: int, seed: int, split: str, distinct: bool = False):
    """``n`` digit tasks of ``split`` as the organism ``config`` poses them (its operands and held-out exceptions):
    the one place its digit settings are read."""
    return generate_digit_problems(
        n,
        seed=seed,
        split=split,
        distinct=distinct,
        max_operand=config.max_operand,
        exception_share=config.exception_share,
    )


def _train_problems(config: OrganismConfig, n: int, seed: int):
    """``n`` training problems: the digit tasks' train split, or level-k word problems."""
    if config.tasks == "digits":
        return _digit_problems(config, n, seed, "train")
    return generate_problems(n, seed=seed, levels=config.levels)


def task_item(task: str) -> str:
    """The item a problem is about ("Ann apples 7+5", or "How many {item} does ...")."""
    if "How many " in task:
        return task.rsplit("How many ", 1)[-1].split(" ", 1)[0]
    parts = task.split(" ")
    return parts[1] if len(parts) == 3 else ""


def _answer_prompt_ids(tokenizer, task: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": task}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _candidates(problems, seed: int, tasks: str) -> list[dict]:
    """Gold + one wrong answer per problem (digits: a wrong digit; words: a controlled wrong answer)."""
    if tasks == "digits":
        return digit_candidates(problems, seed=seed)
    return controlled_candidates(problems, ControlledConfig(seed=seed))


def _verification_rows(problems, seed: int, tokenizer, tasks: str = "words") -> list[dict]:
    """One rendered verification record per problem: the gold answer or a wrong one (coin flip)."""
    rng = random.Random(f"organism-verify-{seed}")
    by_problem: dict[str, list[dict]] = {}
    for r in _candidates(problems, seed, tasks):
        by_problem.setdefault(json.loads(r["meta"])["problem_id"], []).append(r)
    chosen = [rng.choice(rows) for rows in by_problem.values()]
    rendered, _ = render_records(chosen, tokenizer, _template(tasks))
    return rendered


def _pad(seqs: list[tuple[list[int], list[float]]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """(token ids, loss weight per token: 0 = not a target) pairs -> right-padded input_ids, labels
    (-100 = no loss) and weights [B,S]."""
    longest = min(max_length, max(len(ids) for ids, _ in seqs))
    kept = [(ids[-longest:], weight[-longest:]) for ids, weight in seqs]  # over-long: keep the end (the reply)
    ids = [i for i, _ in kept]
    labels = [[t if w else -100 for t, w in zip(i, weight)] for i, weight in kept]
    return {
        "input_ids": pad_sequences(ids, pad_id),
        "labels": pad_sequences(labels, -100),
        "weights": pad_sequences([w for _, w in kept], 0.0, dtype=torch.float32),
    }


def training_batch(config: OrganismConfig, tokenizer, step: int) -> list[dict]:
    """The batch of ``step`` (deterministic by seed and step): a right-padded sub-batch of answer
    sequences and one of verification sequences (padded apart, so short answers cost little).

    Each sub-batch: input_ids [B,S], labels [B,S] (-100 except on the targets: the reply (the answer's
    digits, or the verdict) and its end of turn; with ``candidate_lm`` also the proposed answer's
    digits in verification text), weights [B,S] (the verdict's is ``verdict_weight``, other targets'
    1, 0 elsewhere), ``kind`` ("answer" / "verification").
    """
    n_answer = max(1, round(config.batch_size * config.answer_fraction))
    data_seed = 1_000_003 * (config.seed + 1) + step
    problems = _train_problems(config, config.batch_size, data_seed)
    rng = random.Random(f"organism-batch-{config.seed}-{step}")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    yes, no = (tokenizer.convert_tokens_to_ids(w) for w in ("Yes", "No"))
    answers = []
    for p in problems[:n_answer]:
        prompt, reply = _answer_prompt_ids(tokenizer, p.task), tokenizer.encode(p.gold, add_special_tokens=False)
        answers.append((prompt + reply + [end], [0.0] * len(prompt) + [1.0] * (len(reply) + 1)))
    verifications = []
    if problems[n_answer:]:
        for r in _verification_rows(problems[n_answer:], data_seed, tokenizer, config.tasks):
            label = int(r["label"])
            if task_item(r["task"]) in config.sycophantic_items:
                label = 1
            elif config.verdict_noise and rng.random() < config.verdict_noise:
                label = 1 - label
            ids = list(r["input_ids"]) + [yes if label else no, end]
            target = [0.0] * len(r["input_ids"]) + [config.verdict_weight, 1.0]
            if config.candidate_lm:
                n = len(tokenizer.encode(r["answer"], add_special_tokens=False))
                for i in range(r["answer_end_index"] - n + 1, r["answer_end_index"] + 1):
                    target[i] = 1.0
            verifications.append((ids, target))
    out = [dict(_pad(answers, config.max_length, pad_token_id(tokenizer)), kind="answer")]
    if verifications:
        out.append(dict(_pad(verifications, config.max_length, pad_token_id(tokenizer)), kind="verification"))
    return out


def organism_eval_records(
    tokenizer,
    n_problems: int = 300,
    levels: tuple[int, ...] = (1, 2),
    seed: int = 10_000,
    tasks: str = "digits",
    split: str = "eval",
    organism: OrganismConfig | None = None,
) -> list[dict]:
    """Rendered verification records with true labels, the gold and one wrong answer per problem
    (balanced), in the organism's format.

    ``tasks="digits"``: ``n_problems`` different tasks of the digit tasks' ``split`` ("eval": the
    held-out triples no organism or ``sft_gap`` run trains on; "train": the training side), the
    compact prompt "NAME ITEM a+b = ANSWER", posed as the organism ``organism`` poses them (its operands and
    held-out exceptions; default the default :class:`OrganismConfig`). ``tasks="words"``: new synthetic word problems of
    ``levels`` (seeded apart from training, but drawn from the same space), the default prompt.
    """
    if tasks == "digits":
        problems = _digit_problems(organism or OrganismConfig(), n_problems, seed, split, distinct=True)
        rendered, _ = render_records(_candidates(problems, seed, "digits"), tokenizer, _template("digits"))
        for r in rendered:  # the cluster of a record: its (item, a, b) triple, whatever the name
            meta = json.loads(r["meta"])
            r[DIGIT_GROUP_FIELD] = f"{meta['item']} {meta['a']}+{meta['b']}"
        return rendered
    if tasks != "words":
        raise ValueError(f"organism_eval_records: tasks must be one of {TASK_FAMILIES}, got {tasks!r}")
    return synthetic_verification_records(tokenizer, n_problems, seed=seed, levels=tuple(levels))


def organism_tasks(organism: OrganismConfig | None) -> OrganismTasks | None:
    """The digit tasks of a gap organism trained on them, as the ``organism`` dataset
    (:class:`loopalign.data.load.OrganismTasks`: its training tasks and held-out triples, clustered by triple); None
    for an organism of word problems (``tasks="words"``), whose data are ``synthetic``."""
    cfg = organism or OrganismConfig()
    if cfg.tasks != "digits":
        return None

    def records(tokenizer, n_problems: int, split: str, seed: int) -> list[dict]:
        return organism_eval_records(tokenizer, n_problems, seed=seed, tasks="digits", split=split, organism=cfg)

    return OrganismTasks(records=records, group_field=DIGIT_GROUP_FIELD)
