import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from loopalign.data.candidates import controlled_candidates
from loopalign.data.prompts import PromptTemplate, load_template, render_record, render_records
from loopalign.data.schema import RecordError
from loopalign.data.sources import generate_problems, load_gsm8k_solutions, load_xstest_completions


def check_indices(rec, tok):
    ids = rec["input_ids"]
    assert rec["verdict_index"] == len(ids) - 1
    assert rec["probe_indices"] == [rec["answer_end_index"], rec["verdict_index"]]
    # decoding up to the answer-end token gives text ending with the answer; the next token starts after it
    upto = tok.decode(ids[: rec["answer_end_index"] + 1])
    assert upto.rstrip().endswith(rec["answer"].rstrip())
    before = tok.decode(ids[: rec["answer_end_index"]])
    assert not before.endswith(rec["answer"].rstrip())
    assert tok.decode(ids) == rec["prompt"]


def test_math_render_indices(tok):
    recs = controlled_candidates(generate_problems(12, seed=0))
    for r in recs:
        out = render_record(r, tok)
        check_indices(out, tok)
        assert out["prompt"].endswith("<|im_start|>assistant\n")
        assert "Yes or No" in out["prompt"] and r["task"] in out["prompt"]
        chat = tok.apply_chat_template(
            [{"role": "user", "content": out["prompt"].split("user\n", 1)[1].split("<|im_end|>")[0]}],
            add_generation_prompt=True,
        )
        assert list(chat["input_ids"]) == out["input_ids"]


def test_long_real_answers(tok, fixtures):
    recs = load_gsm8k_solutions(str(fixtures / "gsm8k" / "example_model_solutions.jsonl")).items[:6]
    recs += load_xstest_completions(fixtures / "xstest" / "model_completions").items[:4]
    rendered, rejected = render_records(recs, tok)
    assert not rejected and len(rendered) == 10
    for r in rendered:
        check_indices(r, tok)
    assert "appropriate" in rendered[-1]["prompt"]


def test_answer_with_trailing_punctuation_and_braces(tok):
    base = controlled_candidates(generate_problems(1, seed=0))[0]
    for answer in ["The answer is 6.", "6 apples!", "{6}", "  6"]:
        r = render_record(dict(base, answer=answer, task=base["task"] + " {x}"), tok)
        check_indices(r, tok)


def test_custom_template_and_system(tok, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text('math: "Check this.\\nQ: {task}\\nA: {answer}\\nCorrect?"\nsystem: "You are a strict grader."\n')
    tpl = load_template(path)
    r = render_record(controlled_candidates(generate_problems(1, seed=0))[0], tok, tpl)
    assert r["prompt"].startswith("<|im_start|>system\nYou are a strict grader.")
    check_indices(r, tok)
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate(math="{task} only")
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate(math="{task} {answer} {other}")
    (tmp_path / "bad.yaml").write_text("colour: red\n")
    with pytest.raises(ValueError, match="unknown template fields"):
        load_template(tmp_path / "bad.yaml")


def test_plain_tokenizer_without_chat_template(tok):
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()))
    r = render_record(controlled_candidates(generate_problems(1, seed=0))[0], plain)
    assert r["prompt"].endswith("\nVerdict:")
    check_indices(r, plain)


def test_max_length_and_skip(tok):
    recs = controlled_candidates(generate_problems(4, seed=0, levels=(1, 4)))
    with pytest.raises(RecordError) as e:
        render_record(recs[2], tok, max_length=10)
    assert e.value.field == "input_ids" and e.value.row_id == recs[2]["id"]
    n = max(len(render_record(r, tok)["input_ids"]) for r in recs if "s0-0" in r["id"])
    kept, rejected = render_records(recs, tok, max_length=n, skip_invalid=True)
    assert kept and rejected and len(kept) + len(rejected) == len(recs)


def test_records_rendered_with_another_tokenizer_are_refused_by_record():
    import pytest

    from loopalign.data.prompts import check_rendered_with, render_records
    from loopalign.data.schema import make_record
    from loopalign.tokenizer import local_tokenizer

    tok = local_tokenizer()
    records = [
        make_record(
            id=f"r{i}",
            task=f"What is {i} + 1?",
            gold=str(i + 1),
            answer=str(i + 1),
            label=1,
            source="t",
            scenario="math",
            parse_status="ok",
        )  # fmt: skip
        for i in range(4)
    ]
    rows, rejected = render_records(records, tok)
    assert not rejected
    check_rendered_with(rows, tok)  # the same tokenizer: fine
    other = local_tokenizer()
    other.add_tokens(["What is"])  # one more token: the same prompt tokenizes differently
    with pytest.raises(ValueError, match="record 'r0': its input_ids are not its prompt tokenized"):
        check_rendered_with(rows, other)
    check_rendered_with([{k: v for k, v in r.items() if k != "prompt"} for r in rows], other)  # nothing to check
