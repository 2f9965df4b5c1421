"""Bad inputs and options of the builders fail naming the file / line / option; the counts of every
build reconcile (read = kept + rejected + dropped, per unit); injection rebuilds are atomic."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data_builders import injection, verification
from loopalign.data.candidates import ControlledConfig, balance_split, controlled_candidates, deduplicate_split
from loopalign.data.io import SourceError, load_build, read_jsonl, read_table
from loopalign.data.sources import Problem, load_gsm8k_solutions, load_safety_pairs
from loopalign.data.verification import VerificationBuild
from loopalign.scripts import build_injection


def run(main, args, capsys) -> tuple[int, str]:
    """Exit code and stderr of a CLI ``main`` (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def write(path: Path, lines) -> Path:
    """Write JSONL lines: dicts as JSON, bytes as they are (to make bad lines)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def gsm8k_rows(fixtures, n=3):
    return [json.loads(x) for x in (fixtures / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]]


# ---------------------------------------------------------------- option values, by table

SYN = ["--source", "synthetic", "--n", "2"]
OPTION_CASES = [
    (["--source", "synthetic", "--n", "0"], "--n must be >= 1"),
    (["--source", "synthetic", "--n", "-3"], "--n must be >= 1"),
    (["--source", "gsm8k", "--path", "{fixtures}/gsm8k/test.jsonl", "--n", "0"], "--n must be >= 1"),
    ([*SYN, "--levels", "x"], "--levels must be comma-separated integers"),
    ([*SYN, "--levels", "1,x"], "--levels must be comma-separated integers"),
    ([*SYN, "--levels", "0"], "--levels must be one or more of 1..6"),
    ([*SYN, "--levels", "7"], "--levels must be one or more of 1..6"),
    ([*SYN, "--levels", ","], "--levels must be one or more of 1..6"),
    ([*SYN, "--wrong-per-problem", "-1"], "--wrong-per-problem must be >= 0"),
    ([*SYN, "--n-samples", "0"], "--n-samples must be >= 1"),
    ([*SYN, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ([*SYN, "--batch-size", "0"], "--batch-size must be >= 1"),
    ([*SYN, "--num-loops", "0"], "--num-loops must be >= 1"),
    ([*SYN, "--max-length", "0"], "--max-length must be >= 1"),
    ([*SYN, "--temperature", "-1"], "--temperature must be >= 0"),
]


@pytest.mark.parametrize("args,fragment", OPTION_CASES, ids=[" ".join(a[2:]) for a, _ in OPTION_CASES])
def test_verification_options_name_the_option(tmp_path, fixtures, capsys, args, fragment):
    args = [a.format(fixtures=fixtures) for a in args]
    code, err = run(verification.main, [*args, "--out", tmp_path / "o"], capsys)
    assert code == 2 and fragment in err, err
    assert "invalid literal" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"levels": "x"}, "--levels must be comma-separated integers"),
        ({"levels": (1, "two")}, "--levels must be comma-separated integers"),
        ({"levels": (1.5,)}, "--levels must be comma-separated integers"),
        ({"n": "5"}, "--n must be an integer"),
        ({"n": 0}, "--n must be >= 1"),
    ],
)
def test_verification_build_api_names_the_option(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        VerificationBuild(source="synthetic", out=str(tmp_path / "o"), **kwargs)
    assert VerificationBuild(source="synthetic", out="o", levels="1,3").levels == (1, 3)


TINY = ["--model", "tiny", "--layers", "1", "--n-concepts", "1", "--strengths", "2", "--n-controls", "1"]
INJECTION_CASES = [
    ([*TINY, "--loops", "0"], "--loops must be >= 1"),
    ([*TINY, "--loops", "-2"], "--loops must be >= 1"),
    ([*TINY, "--n-concepts", "0"], "--n-concepts must be in 1..50"),
    ([*TINY, "--n-concepts", "51"], "--n-concepts must be in 1..50"),
    ([*TINY, "--n-controls", "-1"], "--n-controls must be >= 0"),
    ([*TINY, "--batch-size", "0"], "--batch-size must be >= 1"),
    ([*TINY, "--strengths", "x"], "--strengths must be comma-separated numbers"),
    ([*TINY, "--strengths", "0"], "--strengths must be numbers > 0"),
    ([*TINY, "--layers", "x"], "--layers must be 0-based layer indices"),
    ([*TINY, "--loops", "2", "--extraction-loops", "5"], "--extraction-loops: 5 is out of range; values must be < 2"),
    ([*TINY, "--loops", "2", "--injection_loops", "0,2"], "--injection-loops: 2 is out of range; values must be < 2"),
]


@pytest.mark.parametrize("args,fragment", INJECTION_CASES, ids=[" ".join(a[10:]) for a, _ in INJECTION_CASES])
def test_injection_options_name_the_option(tmp_path, capsys, monkeypatch, args, fragment):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(build_injection, "load_model", no_model)  # every value here is refused before it loads
    code, err = run(injection.main, [*args, "--out", tmp_path / "inj"], capsys)
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "inj").exists()


def test_injection_api_zero_is_not_the_default(tmp_path, tok, tiny_ouro):
    for kwargs, fragment in (({"num_loops": 0}, "--loops"), ({"n_concepts": 0}, "--n-concepts")):
        with pytest.raises(ValueError, match=fragment):
            injection.build_injection(tiny_ouro, tok, tmp_path / "inj", layers=(1,), **kwargs)
    with pytest.raises(ValueError, match="num_loops must be >= 1"):
        injection.extract_concept_vectors(tiny_ouro, tok, ("Dust",), ("Desks",), num_loops=0, layers=[1])


# ---------------------------------------------------------------- bad or empty sources, by table


def _src_empty(tmp):
    return ["--source", "gsm8k", "--path", write(tmp / "empty.jsonl", [])]


def _src_blank_lines(tmp):
    return ["--source", "gsm8k", "--path", write(tmp / "blank.jsonl", [b"", b"  "])]


def _src_not_utf8(tmp, fixtures):
    rows = gsm8k_rows(fixtures, 2)
    return ["--source", "gsm8k", "--path", write(tmp / "latin1.jsonl", [rows[0], b'{"question": "caf\xe9?"}', rows[1]])]


def _src_bad_json(tmp, fixtures):
    rows = gsm8k_rows(fixtures, 2)
    return ["--source", "gsm8k", "--path", write(tmp / "broken.jsonl", [rows[0], rows[1], b'{"question": oops'])]


def _src_bad_csv(tmp, fixtures):
    src = (fixtures / "xstest" / "model_completions" / "xstest_v2_completions_gpt4.csv").read_bytes()
    lines = src.split(b"\n")
    lines[1] = lines[1].replace(b"Where", b"Wh\xffere", 1)
    (tmp / "cs").mkdir()
    (tmp / "cs" / "xstest_v2_completions_bad.csv").write_bytes(b"\n".join(lines))
    return ["--source", "xstest-completions", "--path", tmp / "cs"]


def _src_bad_json_array(tmp):
    (tmp / "rows.json").write_bytes(b'[\n{"question": "a", "answer": "#### 1"},\n{"question": "\xff"}\n]')
    return ["--source", "gsm8k", "--path", tmp / "rows.json"]


def _src_all_rejected(tmp):
    rows = [{"question": "Q1?", "answer": "no final answer"}, {"question": "Q2?", "answer": "none either"}]
    return ["--source", "gsm8k", "--path", write(tmp / "allbad.jsonl", rows), "--skip-invalid"]


def _src_one_class(tmp, fixtures):
    line = (fixtures / "safety" / "beavertails_style.jsonl").read_text().splitlines()[0]
    (tmp / "one.jsonl").write_text(line + "\n")
    return ["--source", "safety-pairs", "--path", tmp / "one.jsonl", "--balance"]


def _src_all_too_long(tmp):
    return ["--source", "synthetic", "--n", "2", "--render", "--max-length", "5", "--skip-invalid"]


def _src_no_wrong_answer(tmp, fixtures):
    rows = [{"question": "Big?", "answer": "so\n#### 1e308"}]
    return ["--source", "gsm8k", "--path", write(tmp / "big.jsonl", rows)]


SOURCE_CASES = [
    # (source args, expected fragments of the error)
    (_src_empty, ["empty.jsonl holds none", "0 read"]),
    (_src_blank_lines, ["blank.jsonl holds none", "0 read"]),
    (_src_not_utf8, ["latin1.jsonl: line 2 is not valid UTF-8", "--skip-invalid"]),
    (_src_bad_json, ["broken.jsonl: line 3 is not valid JSON"]),
    (_src_bad_csv, ["xstest_v2_completions_bad.csv: line 2: not valid UTF-8"]),
    (_src_bad_json_array, ["rows.json: line 3 is not valid UTF-8"]),
    (_src_all_rejected, ["2 read", "2 rejected", "2 x answer: no '#### N' final answer", "allbad.jsonl"]),
    (_src_one_class, ["records: 1 made", "1 dropped", "--balance: scenario safety has no label=0 records"]),
    (_src_all_too_long, ["--source synthetic --n 2", "records: 4 made, 4 rejected", "longer than max_length 5"]),
    (_src_no_wrong_answer, ["1 dropped", "no wrong answer possible: the gold '1e308' is not a plain number"]),
]


@pytest.mark.parametrize("make,fragments", SOURCE_CASES, ids=[m.__name__[5:] for m, _ in SOURCE_CASES])
def test_bad_sources_fail_clearly(tmp_path, fixtures, capsys, make, fragments):
    args = make(tmp_path, fixtures) if make.__code__.co_argcount == 2 else make(tmp_path)
    out = tmp_path / "out"
    code, err = run(verification.main, [*args, "--out", out], capsys)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Keys mismatch" not in err and "missing from target" not in err
    assert not out.exists()


def test_empty_build_with_skip_invalid_still_writes_rejected(tmp_path, fixtures, capsys):
    args = _src_all_rejected(tmp_path)
    out = tmp_path / "out"
    assert verification.main([*map(str, args), "--out", str(out)]) == 2
    failed = tmp_path / "out.failed"
    assert str(failed) in capsys.readouterr().err
    rej = read_jsonl(failed / "rejected.jsonl")
    assert [(r["id"], r["field"], r["unit"]) for r in rej] == [
        ("gsm8k-test-0", "answer", "entry"),
        ("gsm8k-test-1", "answer", "entry"),
    ]
    report = json.loads((failed / "report.json").read_text())
    assert report["accounting"]["entries"] == {"read": 2, "kept": 0, "rejected": 2, "dropped": 0}
    # an existing good build survives a rebuild that ends empty; a good build clears the stale report
    good = ["--source", "gsm8k", "--path", str(fixtures / "gsm8k" / "test.jsonl"), "--out", str(out)]
    assert verification.main(good) == 0 and not failed.exists()
    before = load_build(out)[1]["content_hash"]
    assert verification.main([*map(str, args), "--out", str(out), "--overwrite"]) == 2
    assert load_build(out)[1]["content_hash"] == before and failed.exists()


def test_skip_invalid_records_bad_lines(tmp_path, fixtures):
    rows = gsm8k_rows(fixtures, 3)
    path = write(tmp_path / "mixed.jsonl", [rows[0], b'{"question": "caf\xe9"}', b"{oops", rows[1], b"", rows[2]])
    out = tmp_path / "out"
    assert verification.main(["--source", "gsm8k", "--path", str(path), "--skip-invalid", "--out", str(out)]) == 0
    ds, meta = load_build(out)
    rej = read_jsonl(out / "rejected.jsonl")
    assert [(r["line"], r["unit"], r["error"].split(" (")[0]) for r in rej] == [
        (2, "entry", "not valid UTF-8"),
        (3, "entry", "not valid JSON"),
    ]
    assert rej[0]["id"] == "mixed.jsonl:2" and "caf" in rej[0]["row"]
    # the good entries keep their place: the entry after the bad lines is still entry 3
    assert {json.loads(r["meta"])["problem_id"] for r in ds} == {"gsm8k-test-0", "gsm8k-test-3", "gsm8k-test-4"}
    assert meta["accounting"]["entries"] == {"read": 5, "kept": 3, "rejected": 2, "dropped": 0}
    assert meta["accounting"]["rejected_by_reason"]["entries"] == {
        "<line>: not valid JSON": 1,
        "<line>: not valid UTF-8": 1,
    }
    # --n counts entries, bad ones included
    assert (
        verification.main(
            ["--source", "gsm8k", "--path", str(path), "--n", "2", "--skip-invalid", "--out", str(tmp_path / "n2")]
        )
        == 0
    )
    assert load_build(tmp_path / "n2")[1]["accounting"]["entries"] == {
        "read": 2,
        "kept": 1,
        "rejected": 1,
        "dropped": 0,
    }


def test_read_table_names_file_and_line(tmp_path):
    bad = write(tmp_path / "x.jsonl", [{"a": 1}, b"\xff\xfe"])
    with pytest.raises(SourceError, match=r"x\.jsonl: line 2 is not valid UTF-8"):
        read_table(str(bad))
    (tmp_path / "x.csv").write_bytes(b'a,b\n1,2\n3,"multi\nline \xff"\n')
    with pytest.raises(SourceError, match=r"x\.csv: lines 3-4: not valid UTF-8"):
        read_table(str(tmp_path / "x.csv"))


# ---------------------------------------------------------------- counts reconcile


def assert_reconciles(out: Path) -> dict:
    """Every count of a build adds up, per unit, and matches the rows in its files."""
    _, meta = load_build(out)
    acct = meta["accounting"]
    e, r = acct["entries"], acct["records"]
    assert e["read"] == e["kept"] + e["rejected"] + e["dropped"], e
    assert r["made"] == r["kept"] + r["rejected"] + r["dropped"], r
    assert r["kept"] == meta["n_rows"] == sum(v for k, v in meta["counts"].items() if k.startswith("label="))
    assert sum(v for k, v in meta["counts"].items() if k.startswith("scenario=")) == meta["n_rows"]
    rejected = read_jsonl(out / "rejected.jsonl") if (out / "rejected.jsonl").exists() else []
    dropped = read_jsonl(out / "dropped.jsonl") if (out / "dropped.jsonl").exists() else []
    assert len(rejected) == meta["n_rejected"] == e["rejected"] + r["rejected"]
    assert len(dropped) == meta["n_dropped"] == e["dropped"] + r["dropped"]
    for rows, key in ((rejected, "rejected_by_reason"), (dropped, "dropped_by_reason")):
        for unit, name in (("entry", "entries"), ("record", "records")):
            assert sum(x["unit"] == unit for x in rows) == sum(acct[key][name].values())
    assert len(read_jsonl(out / "records.jsonl")) == meta["n_rows"]
    return meta


def test_counts_reconcile_duplicates_and_golds_without_wrong_answers(tmp_path):
    rows = [
        {"problem": "Compute $12 \\times 11$.", "solution": "$\\boxed{132}$", "unique_id": "a"},
        {"problem": "Compute $12 \\times 11$ again.", "solution": "$\\boxed{132}$", "unique_id": "a"},  # same id
        {"problem": "Huge?", "solution": "$\\boxed{1e308}$", "unique_id": "b"},
        {"problem": "Long?", "solution": "$\\boxed{" + "9" * 5000 + "}$", "unique_id": "c"},
        {"problem": "Sym?", "solution": "$\\boxed{x+1}$", "unique_id": "d"},
        {"problem": "Seven?", "solution": "$\\boxed{7}$", "unique_id": "e"},
        {"solution": "$\\boxed{1}$", "unique_id": "f"},  # no problem: rejected entry
    ]
    path = write(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    assert verification.main(["--source", "math", "--path", str(path), "--skip-invalid", "--out", str(out)]) == 0
    meta = assert_reconciles(out)
    assert meta["n_rows"] == 4  # a-gold, a-wrong, e-gold, e-wrong: the duplicate problem's records rejected
    assert meta["counts"]["label=1"] == meta["counts"]["label=0"] == 2
    assert meta["accounting"]["entries"] == {"read": 7, "kept": 3, "rejected": 1, "dropped": 3}
    assert meta["accounting"]["records"] == {"made": 6, "kept": 4, "rejected": 2, "dropped": 0}
    assert meta["accounting"]["rejected_by_reason"]["records"] == {"id: duplicate id": 2}
    dropped = {d["id"]: d["reason"] for d in read_jsonl(out / "dropped.jsonl")}
    assert dropped["math-b"] == "no wrong answer possible: the gold '1e308' is not a plain number"
    assert "5000 digits" in dropped["math-c"] and "not a plain number" in dropped["math-d"]


def test_counts_reconcile_siblings_balance_dedupe(tmp_path, fixtures):
    src = [json.loads(x) for x in (fixtures / "gsm8k" / "example_model_solutions.jsonl").read_text().splitlines()]
    one_bad = dict(src[0], **{"6b_verification": {"solution": "A: 3"}})  # is_correct missing: that answer only
    twin = dict(src[1], **{"175b_finetuning": dict(src[1]["6b_finetuning"])})  # a repeated answer: --dedupe
    no_question = {k: v for k, v in src[2].items() if k != "question"}
    path = write(tmp_path / "sol.jsonl", [one_bad, twin, b"{not json", no_question, src[3]])
    out = tmp_path / "out"
    args = ["--source", "gsm8k-solutions", "--path", str(path), "--skip-invalid", "--dedupe", "--balance"]
    assert verification.main([*args, "--out", str(out)]) == 0
    meta = assert_reconciles(out)
    acct = meta["accounting"]
    assert acct["entries"] == {"read": 5, "kept": 3, "rejected": 2, "dropped": 0}
    assert acct["records"]["made"] == 12 and acct["records"]["rejected"] == 1
    rej = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    assert rej["gsm8k-sol-0-6b_verification"]["unit"] == "record"
    assert rej["gsm8k-sol-0-6b_verification"]["field"] == "6b_verification.is_correct"
    kept_ids = {r["id"] for r in read_jsonl(out / "records.jsonl")}
    dropped = read_jsonl(out / "dropped.jsonl")
    siblings = {f"gsm8k-sol-0-{m}" for m in ("6b_finetuning", "175b_finetuning", "175b_verification")}
    assert siblings <= kept_ids | {d["id"] for d in dropped}  # kept, or dropped with a reason
    reasons = Counter(d["reason"].split(" (")[0] for d in dropped)
    assert reasons["--dedupe: repeats an answer to the same task"] == 1
    assert sum(v for k, v in reasons.items() if k.startswith("--balance")) == meta["balanced_away"] > 0
    assert meta["counts"]["label=0"] == meta["counts"]["label=1"]


def test_sibling_answers_survive_a_bad_one(tmp_path, fixtures):
    lines = (fixtures / "safety" / "pku_saferlhf_style.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    del bad["is_response_1_safe"]
    path = write(tmp_path / "pku.jsonl", [bad, json.loads(lines[1])])
    res = load_safety_pairs(str(path), "pku-saferlhf", skip_invalid=True)
    assert [r["id"] for r in res.items] == ["pku-0-r0", "pku-1-r0", "pku-1-r1"]
    assert [(r.row_id, r.field, r.unit) for r in res.rejected] == [("pku-0-r1", "is_response_1_safe", "record")]
    assert (res.n_read, res.n_converted) == (2, 2)
    with pytest.raises(Exception, match="pku-0-r1"):
        load_safety_pairs(str(path), "pku-saferlhf")
    src = [json.loads(x) for x in (fixtures / "gsm8k" / "example_model_solutions.jsonl").read_text().splitlines()]
    path = write(tmp_path / "sol.jsonl", [dict(src[0], **{"175b_verification": None})])
    res = load_gsm8k_solutions(str(path), skip_invalid=True)
    assert len(res.items) == 3 and [r.row_id for r in res.rejected] == ["gsm8k-sol-0-175b_verification"]


def test_candidate_drops_have_reasons():
    probs = [Problem(f"p{i}", "q?", g, "t") for i, g in enumerate(["1e308", "9" * 5000, "12"])]
    dropped = []
    recs = controlled_candidates(probs, ControlledConfig(drop_without_wrong=True), dropped)
    assert {r["id"] for r in recs} == {"p2-gold", "p2-digit_swap0"}
    assert [(d.row_id, d.unit) for d in dropped] == [("p0", "entry"), ("p1", "entry")]
    assert "more than Python converts" in dropped[1].reason
    dropped = []
    recs = controlled_candidates(probs, ControlledConfig(), dropped)  # default: a lone gold, still recorded
    assert len(recs) == 4 and [(d.row_id, d.unit) for d in dropped] == [("p0-wrong", "record"), ("p1-wrong", "record")]
    kept, gone = balance_split(recs, seed=0)
    assert len(kept) == 2 and len(gone) == 2 and all("label=1 is the majority" in d.reason for d in gone)
    kept, gone = deduplicate_split(recs + [dict(recs[0], id="again")])
    assert kept == recs and [d.row_id for d in gone] == ["again"]


# ---------------------------------------------------------------- injection builds


INJ = ["--model", "tiny", "--loops", "2", "--layers", "1", "--n-concepts", "1", "--strengths", "2", "--n-controls", "1"]


def test_injection_overwrite_is_atomic(tmp_path, monkeypatch, capsys):
    out = tmp_path / "inj"
    assert injection.main([*INJ, "--out", str(out)]) == 0
    _, meta = load_build(out / "trials")
    before = (out / injection.VECTORS_FILE).read_bytes()
    code, err = run(injection.main, [*INJ, "--out", out], capsys)
    assert code == 2 and "--overwrite" in err

    from loopalign.injection import trials as trial_build  # where the build command finds build_trials

    real = trial_build.build_trials

    def bad_trials(tokenizer, config, vectors=None):
        rows = real(tokenizer, config, vectors)
        return rows + [dict(rows[-1], id="control-bad", strength=1.0)]  # fails validation at save time

    monkeypatch.setattr(trial_build, "build_trials", bad_trials)
    args = [*INJ[:3], "3", *INJ[4:]]  # other loops: other vectors
    code, err = run(injection.main, [*args, "--out", out, "--overwrite"], capsys)
    assert code == 2 and "control-bad" in err
    assert (out / injection.VECTORS_FILE).read_bytes() == before  # the old vectors with the old trials
    cv, ds, again = injection.load_injection(out)
    assert again == meta and injection.vectors_hash(cv) == meta["vectors_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inj"]  # no temp folders left
    monkeypatch.setattr(trial_build, "build_trials", real)
    assert injection.main([*args, "--out", str(out), "--overwrite"]) == 0
    cv, _, meta3 = injection.load_injection(out)
    assert cv.num_loops == 3 and meta3["vectors_hash"] != meta["vectors_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inj"]


def test_injection_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "inj").mkdir()
    (tmp_path / "inj" / "notes.txt").write_text("mine")
    code, err = run(injection.main, [*INJ, "--out", tmp_path / "inj", "--overwrite"], capsys)
    assert code == 2 and "notes.txt" in err and (tmp_path / "inj" / "notes.txt").exists()


def test_injection_load_checks_vectors_hash(tmp_path):
    out = tmp_path / "inj"
    assert injection.main([*INJ, "--out", str(out)]) == 0
    path = out / injection.VECTORS_FILE
    cv = injection.load_concept_vectors(path)
    other = injection.ConceptVectors({w: v + 1 for w, v in cv.vectors.items()}, cv.metadata)
    injection.save_concept_vectors(other, path)
    with pytest.raises(ValueError) as e:
        load_build(out / "trials")
    msg = str(e.value)
    assert str(path) in msg and "vectors_hash" in msg
    assert "python -m data_builders.injection --model tiny --loops 2 --layers 1" in msg
    assert f"--out {out}" in msg and msg.endswith("--overwrite")
    load_build(out / "trials", validate=False)  # an explicit opt-out still reads
    path.unlink()
    with pytest.raises(ValueError, match=r"concept_vectors\.safetensors is missing.*rebuild with: python -m"):
        injection.load_injection(out)
    # the command in the message rebuilds a build that loads
    argv = msg.split("rebuild with: python -m data_builders.injection ")[1].split()
    assert injection.main(argv) == 0
    injection.load_injection(out)
    shutil.rmtree(out)


def test_sampled_answers_dropped_are_recorded(tmp_path, capsys):
    args = ["--source", "synthetic", "--n", "3", "--candidates", "sampled", "--policy", "tiny", "--num-loops", "2"]
    args += ["--n-samples", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "s")]
    code, err = run(verification.main, args, capsys)  # a random policy never ends within 4 tokens
    assert code == 2 and "records: 6 made, 0 rejected, 6 dropped" in err and "sampling: 6 answers sampled" in err
    dropped = read_jsonl(tmp_path / "s.failed" / "dropped.jsonl")
    assert len(dropped) == 6 and {d["reason"] for d in dropped} == {"sampled answer unparsed (cut off at 4 tokens)"}
    assert verification.main([*args, "--on-unparsed", "keep"]) == 0
    meta = assert_reconciles(tmp_path / "s")
    assert meta["accounting"]["records"] == {"made": 6, "kept": 6, "rejected": 0, "dropped": 0}
    assert not (tmp_path / "s.failed").exists()
