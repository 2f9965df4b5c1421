import json
import subprocess
import sys

import pytest

from data_builders import injection, verification
from loopalign.data.io import load_build, read_jsonl


def test_help_via_python_m():
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", mod, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for mod in ("data_builders.verification", "data_builders.injection")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "--source" in outs[0][0] and "--render" in outs[0][0] and "--skip-invalid" in outs[0][0]
    assert "--model" in outs[1][0] and "--loops" in outs[1][0] and "--layers" in outs[1][0]
    for mod, (out, _) in zip(("data_builders.verification", "data_builders.injection"), outs):
        assert out.startswith(f"usage: python -m {mod} [--config YAML] [--OPTION VALUE ...]\n"), out[:200]


def test_synthetic_build_deterministic(tmp_path, capsys):
    args = ["--source", "synthetic", "--n", "30", "--seed", "0", "--render", "--tokenizer", "local"]
    assert verification.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert verification.main(args + ["--out", str(tmp_path / "b")]) == 0
    ds, meta = load_build(tmp_path / "a")
    assert meta["content_hash"] == load_build(tmp_path / "b")[1]["content_hash"]
    assert meta["kind"] == "rendered" and len(ds) == 60 and meta["counts"]["label=1"] == 30
    assert set(ds.column_names) >= {"prompt", "input_ids", "verdict_index", "answer_end_index", "probe_indices"}
    assert verification.main(args[:5] + ["1", "--out", str(tmp_path / "c")]) == 0
    assert load_build(tmp_path / "c")[1]["content_hash"] != meta["content_hash"]
    assert verification.main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "exists" in capsys.readouterr().err


def test_real_formats(tmp_path, fixtures):
    out = tmp_path / "sol"
    path = fixtures / "gsm8k" / "example_model_solutions.jsonl"
    assert verification.main(["--source", "gsm8k-solutions", "--path", str(path), "--balance", "--out", str(out)]) == 0
    ds, meta = load_build(out)
    assert meta["counts"]["label=0"] == meta["counts"]["label=1"] > 0
    out = tmp_path / "xs"
    path = fixtures / "xstest" / "model_completions"
    assert (
        verification.main(["--source", "xstest-completions", "--path", str(path), "--render", "--out", str(out)]) == 0
    )
    assert load_build(out)[1]["n_rows"] == 8
    out = tmp_path / "g"
    path = fixtures / "gsm8k" / "test.jsonl"
    assert (
        verification.main(["--source", "gsm8k", "--path", str(path), "--wrong-per-problem", "2", "--out", str(out)])
        == 0
    )
    assert load_build(out)[1]["counts"] == {"label=0": 12, "label=1": 6, "parse_status=ok": 18, "scenario=math": 18}


def test_skip_invalid_cli(tmp_path, fixtures, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (fixtures / "gsm8k" / "test.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + [json.dumps({"question": "Q", "answer": "3"})]) + "\n")
    assert verification.main(["--source", "gsm8k", "--path", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "gsm8k-test-3" in err and "'answer'" in err
    assert not (tmp_path / "x").exists()
    assert (
        verification.main(["--source", "gsm8k", "--path", str(bad), "--skip-invalid", "--out", str(tmp_path / "x")])
        == 0
    )
    _, meta = load_build(tmp_path / "x")
    assert meta["n_rejected"] == 1 and meta["n_rows"] == 6
    assert [r["id"] for r in read_jsonl(tmp_path / "x" / "rejected.jsonl")] == ["gsm8k-test-3"]


def test_sampled_with_tiny_policy(tmp_path):
    args = [
        "--source",
        "synthetic",
        "--n",
        "3",
        "--candidates",
        "sampled",
        "--policy",
        "tiny",
        "--num-loops",
        "2",
        "--n-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "s"),
    ]
    # a random policy never ends within 4 tokens: every answer is cut off, unparsed and dropped
    assert verification.main(args) == 2
    assert not (tmp_path / "s").exists()
    assert verification.main([*args, "--on-unparsed", "keep"]) == 0
    _, meta = load_build(tmp_path / "s")
    assert meta["sampling"]["generated"] == 6 and meta["settings"]["num_loops"] == 2
    assert meta["sampling"]["truncated"] == 6 and meta["counts"]["parse_status=unparsed"] == 6
    with pytest.raises(SystemExit) as stop:  # no --policy: a usage error, before anything is built
        verification.main(["--source", "synthetic", "--candidates", "sampled", "--out", str(tmp_path / "t")])
    assert stop.value.code == 2 and not (tmp_path / "t").exists()


def test_sampled_with_a_plain_causal_lm_policy(llama_folder, tmp_path, capsys):
    """A plain causal LM (a saved tiny Llama, by its folder) samples the candidates at its one loop; asking it for
    loops fails before any sampling, naming the option's value."""
    args = ["--source", "synthetic", "--n", "3", "--candidates", "sampled", "--policy", str(llama_folder),
            "--n-samples", "2", "--max-new-tokens", "4", "--on-unparsed", "keep", "--out", str(tmp_path / "s")]  # fmt: skip
    assert verification.main(args) == 0
    rows, meta = load_build(tmp_path / "s")
    assert meta["sampling"]["generated"] == 6 and meta["settings"]["num_loops"] is None
    assert len({r["answer"] for r in rows}) > 1  # the policy's own (random) text, not a fixed candidate
    assert verification.main([*args[:-1], str(tmp_path / "t"), "--num-loops", "2"]) == 2
    err = capsys.readouterr().err
    assert "num_loops=2" in err and "not a looped model" in err
    assert not (tmp_path / "t").exists()


def test_injection_cli(tmp_path):
    args = [
        "--model",
        "tiny",
        "--loops",
        "2",
        "--layers",
        "1",
        "--n-concepts",
        "2",
        "--strengths",
        "2,4",
        "--n-controls",
        "3",
        "--out",
        str(tmp_path / "inj"),
    ]
    assert injection.main(args) == 0
    ds, meta = load_build(tmp_path / "inj" / "trials")
    assert len(ds) == 2 * 2 * 2 * 1 * 2 + 3 and meta["kind"] == "trial"
    cv = injection.load_concept_vectors(tmp_path / "inj" / "concept_vectors.safetensors")
    assert cv.metadata["model"] == "tiny" and cv.metadata["layers"] == [1] and cv.vectors["Dust"].shape == (2, 1, 64)
    assert injection.main(args + ["--overwrite"]) == 0
    assert load_build(tmp_path / "inj" / "trials")[1]["content_hash"] == meta["content_hash"]
    assert load_build(tmp_path / "inj" / "trials")[1]["vectors_hash"] == meta["vectors_hash"]
    assert (
        injection.main(["--model", "tiny", "--layers", "7", "--n-concepts", "1", "--out", str(tmp_path / "bad")]) == 2
    )


def test_options_take_the_recipes_underscore_spelling_too(tmp_path, capsys):
    """`--wrong_per_problem 2` (the recipes' dialect) is `--wrong-per-problem 2`; an unknown option still fails."""
    base = ["--source", "synthetic", "--n", "12", "--seed", "0"]
    assert verification.main(base + ["--wrong-per-problem", "2", "--out", str(tmp_path / "dashed")]) == 0
    assert verification.main(base + ["--wrong_per_problem=2", "--out", str(tmp_path / "under")]) == 0
    dashed, under = load_build(tmp_path / "dashed")[1], load_build(tmp_path / "under")[1]
    assert dashed["content_hash"] == under["content_hash"] and dashed["n_rows"] == 36  # 12 gold + 24 wrong
    with pytest.raises(SystemExit) as stop:
        verification.main(base + ["--no_such_option", "1", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "--no_such_option" in capsys.readouterr().err


def test_build_data_takes_the_source_as_eval_gap_and_sft_gap_name_it(tmp_path, fixtures, capsys):
    """`--dataset SOURCE:PATH` (the commands' spelling) builds what `--source SOURCE --path PATH` builds; a spec that
    names no source, or both spellings at once, stops with the spec named."""
    path = fixtures / "gsm8k" / "example_model_solutions.jsonl"
    common = ["--balance", "--render", "--tokenizer", "local"]
    assert (
        verification.main(["--source", "gsm8k-solutions", "--path", str(path), *common, "--out", str(tmp_path / "a")])
        == 0
    )
    assert verification.main(["--dataset", f"gsm8k-solutions:{path}", *common, "--out", str(tmp_path / "b")]) == 0
    assert load_build(tmp_path / "a")[1]["content_hash"] == load_build(tmp_path / "b")[1]["content_hash"]
    assert verification.main(["--dataset", "synthetic", "--n", "5", "--out", str(tmp_path / "s")]) == 0
    assert load_build(tmp_path / "s")[1]["settings"]["source"] == "synthetic"
    capsys.readouterr()
    for argv, message in (
        (["--dataset", "nosuch:thing"], "dataset 'nosuch:thing' names no data source"),
        (["--dataset", "gsm8k:"], "dataset 'gsm8k:' names no data source"),
        (["--dataset", "synthetic", "--source", "synthetic"], "not both"),
        ([], "the data source is required"),
    ):
        with pytest.raises(SystemExit) as stop:
            verification.main([*argv, "--out", str(tmp_path / "x")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
