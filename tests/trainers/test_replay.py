"""Task replay: the model's own answers to the training tasks, trained beside the verdict so TP is
kept (tiny random Ouro, real PEFT LoRA, real TRL trainer)."""

import datasets
import pytest
import torch
from peft import LoraConfig

from loopalign import OuroForCausalLM, tiny_config
from loopalign.eval.task import TaskConfig, generate_texts, task_prompts
from loopalign.trainers import GapSFTConfig, GapSFTTrainer, self_replay_dataset
from loopalign.trainers.replay import collate_replay, replay_features


def _model(tok):
    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()


def _always_end(model, tok, bias=40.0):
    """Make the model end its answer after one token (a random tiny model never would)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.sequence_bias = {(end,): bias}


def test_replay_records_are_the_models_own_answers(gap_dataset):
    ds, tok = gap_dataset
    model = _model(tok)
    _always_end(model, tok, bias=5.0)
    tasks = ds["task"]
    build = self_replay_dataset(model, tok, tasks, num_loops=2, max_new_tokens=6)
    unique = list(dict.fromkeys(tasks))
    assert build.n_tasks == len(unique) == 24 and build.max_new_tokens == 6
    assert len(build.dataset) + build.n_cut == 24  # every task is kept or counted as cut off
    prompts = dict(zip(unique, task_prompts(unique, tok, TaskConfig())))
    texts = dict(zip(unique, generate_texts(model, tok, list(prompts.values()), 2, max_new_tokens=6)))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in build.dataset:
        assert row["input_ids"] == prompts[row["task"]]  # TP's prompt
        assert row["completion_ids"][-1] == end
        assert tok.decode(row["completion_ids"][:-1]) == texts[row["task"]].strip()


def test_cut_off_answers_are_left_out_and_counted(gap_dataset):
    ds, tok = gap_dataset
    model = _model(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.sequence_bias = {(end,): -100.0}  # never ends
    with pytest.raises(ValueError, match="all 24 answers were cut off at max_new_tokens=2"):
        self_replay_dataset(model, tok, ds["task"], num_loops=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="no tasks"):
        self_replay_dataset(model, tok, [], num_loops=2)
    kept = self_replay_dataset(model, tok, ds["task"], num_loops=2, max_new_tokens=2, keep_cut=True)
    assert kept.n_cut == 24 and len(kept.dataset) == 24  # kept as the model's own text so far, with no end of turn
    assert all(ids and ids[-1] != end for ids in kept.dataset["completion_ids"])


def test_replay_features_label_the_answer_only():
    rows = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "completion_ids": [8, 9]}])
    (f,) = replay_features(rows)
    assert f["input_ids"] == [5, 6, 7, 8, 9] and f["labels"] == [-100, -100, -100, 8, 9]
    batch = collate_replay([f, {"input_ids": [1], "labels": [1]}], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][1].tolist() == [1, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [1, -100, -100, -100, -100]
    with pytest.raises(ValueError, match="exceed max_length=4"):
        replay_features(rows, max_length=4)
    with pytest.raises(ValueError, match="lacks column"):
        replay_features(datasets.Dataset.from_list([{"input_ids": [1]}]))


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        num_loops=2,
        replay_batch_size=4,
    )
    base.update(kw)
    return GapSFTConfig(**base)


_PEFT = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _replayed(gap_dataset):
    """-> (records, tokenizer, the model, its own answers to the records' tasks as replay records)."""
    ds, tok = gap_dataset
    model = _model(tok)
    _always_end(model, tok, bias=5.0)
    return ds, tok, model, self_replay_dataset(model, tok, ds["task"], num_loops=2, max_new_tokens=6).dataset


def _trainer(model, ds, tok, replay, args) -> GapSFTTrainer:
    return GapSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_PEFT, replay_dataset=replay
    )


def test_replay_term_trains_the_answers_and_needs_its_data(gap_dataset, tmp_path):
    ds, tok, model, replay = _replayed(gap_dataset)
    trainer = _trainer(model, ds, tok, replay, _args(tmp_path, loss_weights={"lm": 1.0, "replay": 1.0}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = [e for e in trainer.state.log_history if "replay_loss" in e]
    assert len(logged) == 3 and all(e["replay_loss"] > 0 for e in logged)
    assert all("replay/loop_1" in e and "replay/loop_2" in e for e in logged)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)

    # the replay term alone moves the adapters too (it is a real loss, not a log line)
    only = _trainer(_model(tok), ds, tok, replay, _args(tmp_path, loss_weights={"lm": 0.0, "replay": 1.0}, max_steps=1))
    start = {n: p.detach().clone() for n, p in only.model.named_parameters() if p.requires_grad}
    only.train()
    moved = [n for n, p in only.model.named_parameters() if p.requires_grad and not torch.equal(start[n], p)]
    assert moved

    for kw, data in (({"lm": 1.0, "replay": 1.0}, None), ({"lm": 1.0}, replay)):
        with pytest.raises(ValueError, match=r"loss_weights\['replay'\] > 0 needs a replay_dataset"):
            _trainer(_model(tok), ds, tok, data, _args(tmp_path, loss_weights=kw))


def test_sft_gap_replays_the_training_tasks_and_the_replay_questions_and_saves_them(
    gap_dataset, tmp_path, sft_gap_script, parse_sft_gap
):
    ds, tok = gap_dataset
    model = _model(tok)
    _always_end(model, tok, bias=5.0)
    questions = tmp_path / "questions.txt"
    questions.write_text("Is grass green?\nName three fruits.\n")
    out = tmp_path / "run"
    argv = ["--model_name_or_path", "tiny", "--output_dir", str(out), "--replay_tasks", "3", "--replay_questions",
            str(questions), "--replay_keep_cut", "true", "--tp_max_new_tokens", "4", "--report_to", "none",
            "--use_cpu", "true"]  # fmt: skip
    script_args, training_args, _ = parse_sft_gap(argv)
    replay = sft_gap_script.replay_records(model, tok, ds, script_args, training_args)
    tasks = list(dict.fromkeys(ds["task"]))
    assert replay["task"] == [*tasks[:3], "Is grass green?", "Name three fruits."]
    saved = datasets.Dataset.from_json(str(out / sft_gap_script.REPLAY_FILE))
    assert saved["task"] == replay["task"] and saved["completion_ids"] == replay["completion_ids"]
    # the questions' prompts are rendered as the tasks' are (same template), and answered by the model itself
    assert replay["input_ids"][3] == task_prompts(["Is grass green?"], tok, TaskConfig())[0]
    assert all(len(c) >= 1 for c in replay["completion_ids"])


def test_kl_replay_starts_at_zero_and_keeps_the_answers_distributions(gap_dataset, tmp_path):
    """replay_kind='kl': the term is KL(base || model) on the replayed answers, the base being the model with its
    adapters off, so it is 0 before the adapters move and grows once the verdict term moves them."""
    ds, tok, model, replay = _replayed(gap_dataset)
    args = _args(tmp_path, loss_weights={"lm": 1.0, "replay": 1.0}, replay_kind="kl")
    trainer = _trainer(model, ds, tok, replay, args)
    trainer.train()
    logged = [e["replay_loss"] for e in trainer.state.log_history if "replay_loss" in e]
    assert len(logged) == 3
    assert logged[0] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter (B = 0) is the base model
    assert logged[-1] > 1e-6  # the verdict term moved the adapters, the replayed answers' distributions with them
    with pytest.raises(ValueError, match="replay_kind must be one of"):
        _args(tmp_path, replay_kind="soft")


def test_each_accumulated_micro_batch_draws_its_own_replay_batch(gap_dataset, tmp_path):
    """With gradient accumulation the replay term draws new records for every micro-batch of a step (keyed by step
    and micro-batch, so a resumed run draws the same ones); the first micro-batch draws as a run without it."""
    ds, tok, _, replay = _replayed(gap_dataset)

    def draws(accumulation):
        seen = []
        args = _args(tmp_path, loss_weights={"lm": 1.0, "replay": 1.0}, max_steps=2, replay_batch_size=2,
                     gradient_accumulation_steps=accumulation)  # fmt: skip
        trainer = _trainer(_model(tok), ds, tok, replay, args)
        original = trainer._replay_loss

        def observed(*args):  # the real term, its draw read after it
            out = original(*args)
            seen.append((trainer.state.global_step, tuple(trainer.replay_picks)))
            return out

        trainer._replay_loss = observed
        trainer.train()
        return seen

    accumulated, single = draws(2), draws(1)
    assert [s for s, _ in accumulated] == [0, 0, 1, 1] and [s for s, _ in single] == [0, 1]
    assert accumulated[0][1] != accumulated[1][1] and accumulated[2][1] != accumulated[3][1]
    assert [accumulated[0], accumulated[2]] == single  # the first micro-batch of each step draws as before
