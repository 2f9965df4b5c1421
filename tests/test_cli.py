"""The ``loopalign`` command (loopalign.cli): its commands, their help, and that ``python -m loopalign
eval-gap`` and ``python recipes/eval_gap.py`` are the same code with the same result."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopalign import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_help_lists_every_command_with_one_line(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for name in ("sft-gap", "eval-gap", "ablate-gap", "ouro-loops", "organism", "build-data", "eval-introspection",
                 "grpo-introspection"):  # fmt: skip
        (line,) = [line for line in printed.splitlines() if line.strip().startswith(name + " ")]
        assert len(line.split(name, 1)[1].strip()) > 10, line
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out


def test_an_unknown_command_fails_naming_it(capsys):
    assert cli.main(["sft_gap"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'sft_gap'" in err and "sft-gap" in err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_help_is_the_scripts_own(command, capsys):
    """``loopalign <cmd> --help`` prints the command's shipped help (its usage names the command, loopalign's own
    options listed); ``--help-all`` runs the script's parser, which lists everything and exits 0."""
    assert cli.main([command, "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed == cli.shipped_help(command)
    assert f"usage: loopalign {command} [--config YAML] [--OPTION VALUE ...]\n" in printed, printed[:300]
    assert "loopalign options:" in printed and "  --" in printed  # the options are listed
    module = cli.COMMANDS[command][0]
    if not _available(module):
        assert cli.main([command, "--help-all"]) == 2
        assert f"command {command!r} is not available in this install (no module {module})" in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help-all"])
    assert done.value.code == 0
    full = capsys.readouterr().out
    full = full[full.index("usage: ") :]  # (transformers prints a line on import when WANDB_MODE is offline)
    assert full.startswith(printed.split("loopalign options:")[0])  # the same usage and description
    assert sys.argv[0] != f"loopalign {command}"  # restored


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_shipped_help_equals_the_commands_parser(command):
    """The help shipped in loopalign_cli/help/ is what the command's parser writes (its own options, then a note
    on the inherited ones): a changed option fails here until ``python -m loopalign.scripts.help_text`` is run."""
    from loopalign.scripts.args import INHERITED_SECTION
    from loopalign.scripts.help_text import command_help, shipped_text

    expected = shipped_text(command)
    assert cli.shipped_help(command) == expected, f"run: python -m loopalign.scripts.help_text ({command})"
    full = command_help(command)
    if f"\n{INHERITED_SECTION}:\n" in full:  # the shipped help stops where the inherited options start
        own = full.split(f"\n{INHERITED_SECTION}:\n")[0]
        assert expected.startswith(own) and f"loopalign {command} --help-all" in expected
        assert len(expected) < len(full) / 2
    else:
        assert expected == full


def test_shipped_help_does_not_depend_on_the_environment(tmp_path):
    """The shipped help is the same text whatever the cache root, terminal width or thread count of the process that
    checks it (a help string that prints a resolved path would ship one machine's path)."""
    env = {**ENV, "LOOPALIGN_CACHE": str(tmp_path / "elsewhere"), "COLUMNS": "57", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "loopalign.scripts.help_text", "--check"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_version_and_help_import_neither_torch_nor_the_package():
    """``loopalign --version``, ``--help`` and ``<command> --help`` answer from loopalign_cli, which imports the
    standard library only: no torch, transformers, TRL or loopalign (whose import registers Ouro: seconds). A
    command, and ``--help-all``, import their module."""
    code = (
        "import contextlib, io, sys\n"
        "import loopalign_cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    codes = [loopalign_cli.main(a) for a in (['--version'], ['--help'], ['sft-gap', '--help'],\n"
        "             ['ablate-gap', '--jobs', '1', '-h', '--', 'sft-gap', '--max_steps', '1'], ['eval-introspection', '-h'])]\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'loopalign', 'yaml') if m in sys.modules)\n"
        "print(codes, heavy, len(out.getvalue().splitlines()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[0, 0, 0, 0, 0] [] "), done.stdout
    assert int(done.stdout.split()[-1]) > 100  # the help was printed
    # python -m loopalign_cli: the same dispatcher without the install
    done = subprocess.run([sys.executable, "-m", "loopalign_cli", "eval-gap", "--help"], capture_output=True,
                          text=True, env=ENV, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout == cli.shipped_help("eval-gap"), done.stderr


def test_a_missing_command_module_is_named(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "later", ("loopalign.scripts.not_written_yet", "a command of a later release"))
    assert cli.main(["later", "--x"]) == 2
    assert "no module loopalign.scripts.not_written_yet" in capsys.readouterr().err


def test_gap_commands_share_one_dialect():
    """sft-gap's before/after evaluation and eval-gap parse the same evaluation options with the same defaults."""
    from loopalign.scripts import eval_gap, sft_gap
    from loopalign.scripts.args import GapEvalArguments

    shared = set(GapEvalArguments.__dataclass_fields__)
    assert shared <= set(sft_gap.GapScriptArguments.__dataclass_fields__)
    assert shared <= set(eval_gap.EvalGapScriptArguments.__dataclass_fields__)
    for name in shared:
        a = sft_gap.GapScriptArguments.__dataclass_fields__[name].default
        b = eval_gap.EvalGapScriptArguments.__dataclass_fields__[name].default
        assert a == b, name


def test_a_bad_option_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["ouro-loops", "--eval_loops", "0"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "usage: loopalign ouro-loops" in err and "eval_loops must be loop counts >= 1" in err
    assert "Traceback" not in err


def test_ouro_loops_runs_in_process_through_the_cli(capsys):
    """``loopalign ouro-loops --max_steps 0``: measures only; the pre-0.2 names were removed before any release,
    so one of them ends the command naming it."""
    assert cli.main(["ouro-loops", "--max_steps", "0", "--eval_loops", "1-2"]) == 0
    out, _ = capsys.readouterr()
    assert "| 1 |" in out and "| 2 |" in out and "| 3 |" not in out and "After" not in out
    with pytest.raises(SystemExit) as done:
        cli.main(["ouro-loops", "--steps", "0"])
    assert done.value.code == 2 and "['--steps', '0']" in capsys.readouterr().err


def test_python_m_loopalign_and_the_recipe_give_the_same_evaluation(tmp_path):
    """The same tiny evaluation through ``python -m loopalign eval-gap`` (current option names) and
    ``python recipes/eval_gap.py`` (a YAML for most options): identical tables."""
    config = tmp_path / "eval.yaml"
    config.write_text(
        "model_name_or_path: tiny\neval_loops: '1,3'\ndataset_limit: 10\neval_folds: 3\neval_n_boot: 30\n"
        "controls: false\neval_tp: false\n"
    )
    cli_argv = [sys.executable, "-m", "loopalign", "eval-gap", "--model_name_or_path", "tiny", "--eval_loops", "1,3",
                "--dataset_limit", "10", "--eval_folds", "3", "--eval_n_boot", "30", "--no_controls", "--no_eval_tp",
                "--output_dir", str(tmp_path / "cli")]  # fmt: skip
    recipe_argv = [sys.executable, str(ROOT / "recipes" / "eval_gap.py"), "--config", str(config),
                   "--output_dir", str(tmp_path / "recipe")]  # fmt: skip
    for argv in (cli_argv, recipe_argv):
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    cli_run, recipe_run = (json.loads((tmp_path / d / "gap.json").read_text()) for d in ("cli", "recipe"))
    assert [row["loop"] for row in cli_run["table"]] == [1, 3]
    assert cli_run["table"] == recipe_run["table"] and cli_run["config"] == recipe_run["config"]


def test_the_default_loops_follow_the_models_depth():
    """eval_loops unset: 1 to the trained depth + 2 for a looped model, one loop for a plain causal LM."""
    from transformers import LlamaConfig

    from loopalign import tiny_config
    from loopalign.scripts.args import default_eval_loops

    assert default_eval_loops(tiny_config()) == list(range(1, tiny_config().total_ut_steps + 3))
    assert default_eval_loops(LlamaConfig(num_hidden_layers=2)) == [1]


@pytest.mark.slow
def test_ablate_gap_runs_its_sft_gap_runs_through_the_cli_and_resumes(tmp_path, capsys, benchmark_script):
    """``loopalign ablate-gap``: one variant x one seed as a ``python -m loopalign sft-gap`` subprocess (a tiny
    model, 3 steps), the table; run again, the finished run is reused."""
    out = tmp_path / "abl"
    argv = ["ablate-gap", "--variants", "lm", "--seeds", "0", "--jobs", "1", "--output_dir", str(out), "--",
            "--model_name_or_path", "tiny", "--dataset", "synthetic", "--dataset_limit", "40", "--max_steps", "3",
            "--eval_loops", "4", "--eval_n_boot", "20", "--no_eval_tp", "--loss_weights", '{"lm": 1.0}']  # fmt: skip
    assert cli.main(argv) == 0
    assert "1 runs to do" in capsys.readouterr().out
    assert (out / "lm" / "seed-0" / "compare.json").exists() and (out / "ablation.png").exists()
    saved = json.loads((out / "ablation.json").read_text())
    rows = saved["rows"]
    assert rows[0]["variant"] == "lm + replay" and rows[0]["n_seeds"] == 1
    (rule,) = saved["rule"]  # the verdict rule's parts per variant, from the run's own compare.json
    assert rule["variant"] == "lm + replay" and rule["n_judged"] == 1 and set(rule["parts"]) == set("abcdef")
    assert "The verdict rule per variant" in (out / "ablation.md").read_text()
    # the docs' tables regenerate from the JSON alone
    script = benchmark_script("ablation_table")
    assert script.table(saved) == (out / "ablation.md").read_text()
    assert cli.main(argv) == 0 and "0 runs to do" in capsys.readouterr().out


@pytest.mark.slow
def test_ablate_gap_runs_on_a_plain_causal_lm(llama_folder, tmp_path, capsys):
    """The runs' options after ``--`` take any causal LM: a saved tiny Llama trains as a one-loop model in each run
    (the replay-free variant: a random model does not answer, so it has nothing to replay) and the table reads its
    single loop."""
    out = tmp_path / "abl"
    argv = ["ablate-gap", "--variants", "lm_no_replay", "--seeds", "1", "--jobs", "1", "--eval_n_boot", "20",
            "--output_dir", str(out), "--", "--model_name_or_path", str(llama_folder), "--dataset", "synthetic",
            "--dataset_limit", "40", "--max_steps", "2", "--eval_n_boot", "20", "--no_eval_tp",
            "--lora_target_modules", "q_proj", "v_proj", "--probe_layer", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "1 runs to do" in capsys.readouterr().out
    table = json.loads((out / "ablation.json").read_text())
    assert table["depth"] == 1 and table["seeds"] == [1]
    assert table["rows"][0]["variant"] == "lm only, no replay" and table["rows"][0]["n_seeds"] == 1
    settings = json.loads((out / "lm_no_replay" / "seed-1" / "final" / "gap_config.json").read_text())
    assert settings["num_loops"] == 1 and settings["probe_layer"] == 1


def test_the_organismsrebuild_command_parses_back_to_its_config(tmp_path):
    """The command loopalign.organism prints for a stale organism (bools, tuples, another folder) is one
    that ``loopalign organism`` parses back to the same settings."""
    import shlex

    from loopalign.organism import OrganismConfig, rebuild_command
    from loopalign.scripts import pretrain_organism

    config = OrganismConfig(seed=3, candidate_lm=False, levels=(1, 2), sycophantic_items=("apples", "pens"), steps=90)
    command = shlex.split(rebuild_command(tmp_path / "elsewhere", config))
    assert command[:3] == ["python", "recipes/pretrain_organism.py", "--force"]
    script_args, organism_args = pretrain_organism.build_parser().parse_args_and_config(args=command[2:])
    assert organism_args.organism_config() == config and script_args.force
    assert script_args.output_dir == str(tmp_path / "elsewhere")


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0 and cli.main(["-V"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"loopalign {version('loopalign')}"] * 2


def test_a_commands_help_lists_loopalign_options_first_under_a_one_line_usage():
    """`loopalign sft-gap --help`: the usage is one line naming --config; loopalign's own options (its script
    arguments and what GapSFTConfig adds to TRL's SFTConfig) come before the inherited TRL / transformers ones."""
    from loopalign.scripts import sft_gap
    from loopalign.scripts.args import INHERITED_SECTION, OWN_SECTION

    text = sft_gap.build_parser([]).format_help()
    assert text.splitlines()[0].endswith(" [--config YAML] [--OPTION VALUE ...]") and text.startswith("usage: ")
    own, inherited = text.index(OWN_SECTION + ":"), text.index(INHERITED_SECTION + ":")
    assert own < inherited
    for name in ("--eval_loops", "--dataset ", "--lora_layers", "--loss_weights", "--distill_kind"):
        assert own < text.index(name) < inherited, name
    for name in ("--lora_r,", "--gradient_accumulation_steps", "--model_name_or_path"):
        assert text.index(name) > inherited, name
    # the regrouping moves help lines only: the same options still parse
    (script_args, training_args, model_args) = sft_gap.build_parser([]).parse_args_and_config(
        args=["--dataset", "synthetic", "--lora_layers", "1-2", "--lora_r", "4", "--output_dir", "o"]
    )
    assert (script_args.dataset, script_args.lora_layers, model_args.lora_r) == ("synthetic", "1-2", 4)
    assert training_args.output_dir == "o"


def test_each_cpu_default_has_one_home():
    """[architecture-2] item 5: a command's CPU default (what runs without --config) is one shipped YAML,
    loopalign/configs/<command>_cpu_default.yaml, read by the command itself; recipes/configs/ links to it (the same
    file), and no script keeps a second copy as a dict."""
    from loopalign.scripts.args import SHIPPED_CONFIGS, cpu_default_config

    commands = ("sft_gap", "grpo_introspection", "eval_introspection")
    assert sorted(p.name for p in SHIPPED_CONFIGS.glob("*.yaml")) == sorted(f"{c}_cpu_default.yaml" for c in commands)
    for command in commands:
        shipped = cpu_default_config(command)
        assert (ROOT / "recipes" / "configs" / shipped.name).samefile(shipped)
        source = (ROOT / "loopalign" / "scripts" / f"{command}.py").read_text()
        assert "EMBEDDED_DEFAULTS" not in source and f'apply_cpu_default(parser, "{command}")' in source
    with pytest.raises(FileNotFoundError, match="shipped CPU default of nosuch is missing"):
        cpu_default_config("nosuch")
