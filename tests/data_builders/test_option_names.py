"""The builders speak the commands' one dialect (make_parser + parse_or_exit over a dataclass): every spelling of an
option (--dashed-name, --underscored_name, the recipes' names --output_dir, --dataset_limit, --synthetic_levels,
--dataset_split, --data_seed, --model_name_or_path) sets the same setting, on the command line and as a key of a
--config YAML; bare flags (--render) still switch on; a bad value ends the command with exit status 2 and the
option's name before anything is built."""

import json

import pytest
import yaml

from loopalign import cli
from loopalign.data.io import load_build
from loopalign.scripts import build_data, build_injection, build_statements
from loopalign.scripts.args import parse_or_exit

COMMANDS = {"build-data": build_data, "build-statements": build_statements, "build-injection": build_injection}
#: the least each command needs to parse
BASE = {
    "build-data": ["--source", "synthetic"],
    "build-statements": [],
    "build-injection": ["--model", "tiny"],
}

#: command -> option (dest) -> (every spelling that works, a value, what the value reads as)
SPELLINGS = {
    "build-data": {
        "out": (["--out", "--output_dir", "--output-dir"], "D", "D"),
        "n": (["--n", "--dataset_limit", "--dataset-limit"], "7", 7),
        "seed": (["--seed", "--data_seed", "--data-seed"], "3", 3),
        "levels": (["--levels", "--synthetic_levels", "--synthetic-levels"], "1,2", (1, 2)),
        "split": (["--split", "--dataset_split", "--dataset-split"], "train", "train"),
        "field_map": (["--field_map", "--field-map"], "pku-saferlhf", "pku-saferlhf"),
        "wrong_per_problem": (["--wrong_per_problem", "--wrong-per-problem"], "2", 2),
        "num_loops": (["--num_loops", "--num-loops"], "2", 2),
        "max_new_tokens": (["--max_new_tokens", "--max-new-tokens"], "9", 9),
        "on_unparsed": (["--on_unparsed", "--on-unparsed"], "keep", "keep"),
    },
    "build-statements": {
        "out": (["--out", "--output_dir", "--output-dir"], "D", "D"),
        "seed": (["--seed", "--data_seed", "--data-seed"], "5", 5),
        "per_family": (["--per_family", "--per-family"], "20", 20),
        "eval_fraction": (["--eval_fraction", "--eval-fraction"], "0.3", 0.3),
    },
    "build-injection": {
        "model": (["--model", "--model_name_or_path", "--model-name-or-path"], "other", "other"),
        "out": (["--out", "--output_dir", "--output-dir"], "D", "D"),
        "extraction_loops": (["--extraction_loops", "--extraction-loops"], "0,1", (0, 1)),
        "n_controls": (["--n_controls", "--n-controls"], "3", 3),
        "n_concepts": (["--n_concepts", "--n-concepts"], "2", 2),
    },
}
CASES = [
    (command, dest, spelling) for command, table in SPELLINGS.items() for dest in table for spelling in table[dest][0]
]


def parse(command: str, argv):
    """The command's parsed options (its ScriptArguments), through the command's own parser."""
    (args,) = parse_or_exit(COMMANDS[command].build_parser(), [str(a) for a in argv])
    return args


def settings(command, args):
    """What the options build: the build's config (build-data, build-statements) or the injection grid."""
    if command == "build-injection":
        return {**vars(args), **args.grid(), "command": args.command("x")}
    return vars(args.build_config())


@pytest.mark.parametrize("command, dest, spelling", CASES, ids=[f"{c} {s}" for c, _, s in CASES])
def test_every_spelling_of_an_option_sets_the_same_setting(tmp_path, monkeypatch, command, dest, spelling):
    monkeypatch.chdir(tmp_path)  # build-statements refuses an --out that exists
    spellings, value, read = SPELLINGS[command][dest]
    base = (BASE[command] if dest != "model" else []) + ([] if dest == "out" else ["--out", "D"])
    args = parse(command, [*base, spelling, value])
    assert settings(command, args)[dest] == read
    # the same as the first spelling, and the same as the spelling as a --config YAML key
    assert settings(command, args) == settings(command, parse(command, [*base, spellings[0], value]))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({spelling.lstrip("-"): value}))
    assert settings(command, args) == settings(command, parse(command, [*base, "--config", config]))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_takes_both_spellings_and_an_unknown_one_fails(command, capsys):
    p = COMMANDS[command].build_parser()
    names = {s for a in p._actions for s in a.option_strings}
    long = [s for s in names if s.startswith("--") and s != "--help"]
    assert long and all(
        "--" + s[2:].replace("-", "_") in names and "--" + s[2:].replace("_", "-") in names for s in long
    )
    with pytest.raises(SystemExit) as stop:
        parse(command, [*BASE[command], "--out", "D", "--no_such_option", "1"])
    assert stop.value.code == 2 and "--no_such_option" in capsys.readouterr().err


FLAGS = {
    "build-data": ["render", "balance", "dedupe", "skip_invalid", "overwrite"],
    "build-statements": ["render", "overwrite"],
    "build-injection": ["overwrite"],
}
FLAG_CASES = [(c, f) for c, flags in FLAGS.items() for f in flags]


@pytest.mark.parametrize("command, flag", FLAG_CASES, ids=[f"{c} --{f}" for c, f in FLAG_CASES])
def test_a_bare_flag_switches_on(tmp_path, monkeypatch, command, flag):
    monkeypatch.chdir(tmp_path)
    for spelling in (f"--{flag}", f"--{flag.replace('_', '-')}"):
        assert getattr(parse(command, [*BASE[command], spelling, "--out", "D"]), flag) is True  # before an option
        assert getattr(parse(command, [*BASE[command], "--out", "D", spelling]), flag) is True  # last
        assert getattr(parse(command, [*BASE[command], "--out", "D", spelling, "false"]), flag) is False
    assert getattr(parse(command, [*BASE[command], "--out", "D"]), flag) is False


def test_the_defaults_are_the_builders_own():
    data = parse("build-data", ["--source", "synthetic", "--out", "D"]).build_config()
    assert (data.n, data.seed, data.levels, data.split, data.candidates, data.n_samples, data.batch_size) == (
        None, 0, (1, 2, 3, 4), "test", "controlled", 4, 8
    )  # fmt: skip
    statements = parse("build-statements", ["--out", "D"]).build_config()
    assert (statements.per_family, statements.seed, statements.eval_fraction, statements.tokenizer) == (
        300, 0, 0.2, "local"
    )  # fmt: skip
    injection = parse("build-injection", ["--model", "tiny", "--out", "D"])
    assert injection.grid() == {"layers": None, "extraction_loops": None, "injection_loops": None,
                                "strengths": (1.0, 2.0, 4.0, 8.0)}  # fmt: skip
    assert (injection.n_controls, injection.batch_size, injection.device, injection.loops) == (50, 16, "cpu", None)


# ---------------------------------------------------------------- --config YAML, through the command table


def run(argv, capsys) -> tuple[int, str, str]:
    """``loopalign <command> ...`` -> (exit status, stdout, stderr): a usage error exits, a failed build returns 2."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_build_data_reads_a_config_yaml_and_the_command_line_overrides_it(tmp_path, capsys):
    config = tmp_path / "builder.yaml"
    config.write_text(
        yaml.safe_dump({"source": "synthetic", "dataset_limit": 4, "data_seed": 3, "levels": [1, 2], "render": True})
    )
    code, out, err = run(["build-data", "--config", config, "--output_dir", tmp_path / "a"], capsys)
    assert code == 0, err
    assert json.loads(out)["n_rows"] == 8  # 4 problems, gold + one wrong answer each
    _, meta = load_build(tmp_path / "a")
    assert meta["kind"] == "rendered" and meta["settings"]["n"] == 4 and meta["settings"]["seed"] == 3
    assert meta["settings"]["levels"] == [1, 2]
    argv = ["--source", "synthetic", "--n", "4", "--seed", "3", "--levels", "1,2", "--render", "--out", tmp_path / "b"]
    assert run(["build-data", *argv], capsys)[0] == 0
    assert load_build(tmp_path / "b")[1]["content_hash"] == meta["content_hash"]  # the same build
    assert run(["build-data", "--config", config, "--n", "2", "--out", tmp_path / "c"], capsys)[0] == 0
    assert load_build(tmp_path / "c")[1]["n_rows"] == 4  # the command line wins


def test_build_statements_reads_a_config_yaml(tmp_path, capsys):
    config = tmp_path / "statements.yaml"
    config.write_text(
        yaml.safe_dump({"families": ["numeric", "continent"], "per_family": 20, "out": str(tmp_path / "s")})
    )
    code, out, err = run(["build-statements", "--config", config], capsys)
    assert code == 0, err
    assert json.loads(out)["n_rows"] == 40
    _, meta = load_build(tmp_path / "s")
    assert meta["settings"]["families"] == ["numeric", "continent"] and meta["settings"]["per_family"] == 20
    code, _, err = run(["build-statements", "--config", config, "--data_seed", "1", "--out", tmp_path / "t"], capsys)
    assert code == 0, err
    assert load_build(tmp_path / "t")[1]["settings"]["seed"] == 1


def test_build_injection_reads_a_config_yaml(tmp_path, capsys):
    config = tmp_path / "injection.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "tiny",
                "loops": 2,
                "layers": [1],
                "n_concepts": 1,
                "strengths": [2, 4],
                "n_controls": 1,
            }
        )  # fmt: skip
    )
    code, out, err = run(["build-injection", "--config", config, "--out", tmp_path / "inj"], capsys)
    assert code == 0, err
    _, meta = load_build(tmp_path / "inj" / "trials")
    assert meta["settings"]["layers"] == [1] and meta["settings"]["strengths"] == [2.0, 4.0]
    assert meta["command"].startswith("loopalign build-injection --model tiny --loops 2 --layers 1 --strengths 2,4")
    assert json.loads(out)["n_rows"] == 1 * 2 * 2 * 1 * 2 + 1


def test_two_spellings_of_one_option_in_a_config_fail_naming_both(tmp_path, capsys):
    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"source": "synthetic", "out": str(tmp_path / "a"), "output_dir": "b"}))
    code, _, err = run(["build-data", "--config", config], capsys)
    assert code == 2 and "'out' and 'output_dir' are the same option" in err
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- bad values: exit 2, the option named, nothing built

BAD = [
    (["build-statements", "--per_family", "-3"], "--per-family"),
    (["build-statements", "--eval_fraction", "2"], "--eval-fraction"),
    (["build-statements", "--families", "atlantis"], "--families"),
    (["build-statements", "--per_family", "many"], "--per_family"),
    (["build-data", "--source", "synthetic", "--levels", "abc"], "--levels"),
    (["build-data", "--source", "synthetic", "--synthetic_levels", "9"], "--levels"),
    (["build-data", "--source", "synthetic", "--n", "-3"], "--n must be >= 1"),
    (["build-data", "--source", "table", "--path", "x.csv", "--columns", "a=b", "--scenario", "poem"], "--scenario"),
    (["build-data", "--source", "nowhere"], "--source"),
    (["build-data", "--source", "synthetic", "--candidates", "sampled"], "--policy"),
    (["build-data", "--source", "synthetic", "--temperature", "-1"], "--temperature"),
    (["build-injection", "--model", "tiny", "--strengths", "abc"], "--strengths"),
    (["build-injection", "--model", "tiny", "--loops", "0"], "--loops"),
    (["build-injection", "--model", "tiny", "--layers", "-1"], "--layers"),
    (["build-injection", "--model", "tiny", "--loops", "2", "--injection_loops", "3"], "--injection-loops"),
]


@pytest.mark.parametrize("argv, option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_exits_2_naming_the_option_before_anything_is_built(tmp_path, monkeypatch, capsys, argv, option):
    def nothing(*args, **kwargs):
        raise AssertionError("the build started before the options were checked")

    for module, name in ((build_data, "build_verification"), (build_statements, "build_statements"),
                         (build_injection, "load_model"), (build_injection, "build_injection")):  # fmt: skip
        monkeypatch.setattr(module, name, nothing)
    code, _, err = run([*argv, "--out", tmp_path / "out"], capsys)
    assert code == 2 and option in err, err
    assert f"usage: loopalign {argv[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_bad_value_in_a_config_yaml_exits_2_naming_the_option(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"per_family": 41, "out": str(tmp_path / "out")}))
    code, _, err = run(["build-statements", "--config", config], capsys)
    assert code == 2 and "--per-family" in err and not (tmp_path / "out").exists()
    config.write_text(yaml.safe_dump({"source": "synthetic", "dataset_limit": 0, "out": str(tmp_path / "out")}))
    code, _, err = run(["build-data", "--config", config], capsys)
    assert code == 2 and "--n must be >= 1" in err and not (tmp_path / "out").exists()
