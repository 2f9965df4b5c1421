"""The library says things through the ``loopalign`` logger; the commands show them on standard output."""

import ast
import contextlib
import io
import logging
from pathlib import Path

import pytest

from loopalign.log import ROOT_LOGGER, enable_console, get_logger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_root_logger():
    logger = logging.getLogger(ROOT_LOGGER)
    saved = (logger.level, list(logger.handlers))
    logger.handlers = [h for h in logger.handlers if type(h).__name__ != "_StdoutHandler"]
    yield logger
    logger.setLevel(saved[0])
    logger.handlers = saved[1]


def test_module_loggers_descend_from_loopalign():
    assert get_logger("loopalign.trainers.gap_data").name == "loopalign.trainers.gap_data"
    assert get_logger("loopalign").name == ROOT_LOGGER
    assert get_logger("data_builders.injection").name == ROOT_LOGGER  # another package's modules log as loopalign


def test_enable_console_shows_info_on_the_current_stdout_once(clean_root_logger, monkeypatch):
    monkeypatch.delenv("LOOPALIGN_VERBOSITY", raising=False)
    log = get_logger("loopalign.speed")
    enable_console()
    enable_console()  # idempotent: one line per message however often a command calls it
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # redirected after the handler exists: it still follows sys.stdout
        log.info("built the thing")
        log.debug("details")
    assert out.getvalue() == "built the thing\n"


def test_verbosity_comes_from_the_environment_and_a_bad_one_names_the_variable(clean_root_logger, monkeypatch):
    monkeypatch.setenv("LOOPALIGN_VERBOSITY", "warning")
    enable_console()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        get_logger("loopalign.io").info("quiet")
        get_logger("loopalign.io").warning("loud")
    assert out.getvalue() == "loud\n"
    monkeypatch.setenv("LOOPALIGN_VERBOSITY", "chatty")
    with pytest.raises(ValueError, match="LOOPALIGN_VERBOSITY must be one of"):
        enable_console()


def _prints_outside_main(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside_main = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            inside_main.update(id(n) for n in ast.walk(node))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
        and id(node) not in inside_main
    ]


def test_the_library_below_the_commands_logs_instead_of_printing():
    """Only the commands print (loopalign/scripts/, cli.py and the data builders' ``main``): what a library module
    has to say goes through its logger, which a user can silence, redirect or raise."""
    offenders = {}
    for path in sorted((ROOT / "loopalign").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("loopalign/scripts/") or rel in ("loopalign/cli.py", "loopalign/__main__.py"):
            continue
        lines = _prints_outside_main(path)
        if lines:
            offenders[rel] = lines
    assert not offenders, f"print() in library modules (use loopalign.log.get_logger): {offenders}"


def test_a_bad_verbosity_ends_a_command_with_a_usage_error_not_a_traceback(clean_root_logger, monkeypatch, capsys):
    from loopalign import cli

    monkeypatch.setenv("LOOPALIGN_VERBOSITY", "chatty")
    with pytest.raises(SystemExit) as done:
        cli.main(["ouro-loops", "--max_steps", "0"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "LOOPALIGN_VERBOSITY must be one of" in err and "Traceback" not in err
