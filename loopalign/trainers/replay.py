"""Task replay: keep the model's task performance while its verdict is trained.

Training the verdict alone teaches a small model to answer every prompt with its verdict words: on
the organism, gap SFT with the ``lm`` term only cured SV (61.7 -> 95.3% at loop 4) while TP fell
from 100 to 64%, 102 of the 107 wrong answers being "No". Replay mixes in the base model's own
answers to the training tasks, generated once before training (greedy, at the trained depth; no
gold answer is read, so it needs no labels), and trains them with the per-loop LM loss (the
``replay`` term of ``GapSFTTrainer``): the adapters learn the verdict and keep the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from loopalign.batching import pad_right
from loopalign.data.sources import answer_token_budget
from loopalign.eval.task import TaskConfig, generate_texts, task_prompts

__all__ = ["ReplayBuild", "self_replay_dataset", "replay_features", "collate_replay"]


@dataclass
class ReplayBuild:
    """The replay records and what happened to the tasks."""

    dataset: object  # datasets.Dataset: task, input_ids (prompt), completion_ids (answer + end of turn)
    n_tasks: int  # distinct tasks asked
    n_cut: int  # answers cut off by max_new_tokens: left out (an unfinished answer is not one to keep), or kept
    # without an end of turn with keep_cut
    max_new_tokens: int


def self_replay_dataset(
    model,
    tokenizer,
    tasks: Sequence[str],
    num_loops: int,
    max_new_tokens: int | None = None,
    sources: Sequence[str] = (),
    batch_size: int = 16,
    task_config=None,
    keep_cut: bool = False,
) -> ReplayBuild:
    """The model's own greedy answers to ``tasks`` (distinct, in order) at ``num_loops`` loops, as
    replay records. Call it on the base model, before training. ``max_new_tokens``: default the
    sources' answer budget (``loopalign.data.sources.answer_token_budget``); ``task_config``: the
    :class:`loopalign.eval.TaskConfig` whose prompt format (template, system turn) TP uses. ``keep_cut``: keep the
    answers the budget cut off, as the model's own text so far with no end of turn (nothing teaches the model to stop
    there): for open-ended tasks ("Tell me about Paris.") whose answers run past any small budget; an answer that
    must be finished to be right (math) is better left out."""
    config = task_config or TaskConfig()
    unique = list(dict.fromkeys(str(t) for t in tasks))
    if not unique:
        raise ValueError("self_replay_dataset: no tasks to replay")
    budget = int(max_new_tokens or config.max_new_tokens or answer_token_budget(list(sources)))
    prompts = task_prompts(unique, tokenizer, config)
    was_training = model.training
    model.eval()
    texts, finished = generate_texts(
        model, tokenizer, prompts, num_loops, max_new_tokens=budget, batch_size=batch_size, return_finished=True
    )
    model.train(was_training)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(end, int) or end == tokenizer.unk_token_id:
        end = tokenizer.eos_token_id
    rows, n_cut = [], 0
    for task, prompt, text, done in zip(unique, prompts, texts, finished):
        if not done:
            n_cut += 1
            if not keep_cut:
                continue
        answer = tokenizer.encode(text.strip(), add_special_tokens=False)
        if not done and not answer:  # cut off with nothing to keep
            continue
        rows.append({"task": task, "input_ids": list(prompt), "completion_ids": answer + ([end] if done else [])})
    if not rows:
        raise ValueError(
            f"self_replay_dataset: all {len(unique)} answers were cut off at max_new_tokens={budget}: raise it "
            "(sft_gap: --tp_max_new_tokens) or, for a model that does not answer its tasks (a random tiny one), "
            "train without replay (loss_weights replay 0)"
        )
    return ReplayBuild(datasets.Dataset.from_list(rows), len(unique), n_cut, budget)


def replay_features(dataset, max_length: int | None = None) -> list[dict]:
    """Replay records -> features {input_ids, labels} (labels: -100 on the prompt, the answer's ids
    after it). Errors name the record at fault."""
    missing = [c for c in ("input_ids", "completion_ids") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"replay dataset lacks column(s) {missing} (has {dataset.column_names})")
    out = []
    for i, row in enumerate(dataset):
        prompt, answer = list(row["input_ids"]), list(row["completion_ids"])
        if not prompt or not answer:
            raise ValueError(f"replay record {i} ({row.get('task')!r}): empty 'input_ids' or 'completion_ids'")
        if max_length is not None and len(prompt) + len(answer) > max_length:
            raise ValueError(
                f"replay record {i} ({row.get('task')!r}): {len(prompt) + len(answer)} tokens exceed "
                f"max_length={max_length}"
            )
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def collate_replay(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads replay features (the gap features' padder). -> input_ids, attention_mask, labels [B,S]."""
    return pad_right(features, pad_token_id)
