"""The help each ``loopalign`` command ships (``loopalign_cli/help/<command>.txt``), what ``loopalign <command>
--help`` prints without importing torch, transformers or TRL: the command's own help, as its parser writes it, up to
the options inherited from TRL and transformers, which ``--help-all`` lists (they change with TRL's version).

    python -m loopalign.scripts.help_text            # rewrite every command's shipped help from its parser
    python -m loopalign.scripts.help_text --check    # exit 1 naming each command whose shipped help differs

``tests/test_cli.py`` keeps the shipped help equal to the parsers (a changed option fails it until this is run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import textwrap

import yaml

from loopalign.io import atomic_write_text
from loopalign.scripts.args import INHERITED_SECTION, SHIPPED_CONFIGS
from loopalign_cli import COMMANDS, HELP_ALL, HELP_DIR, shipped_help

__all__ = ["WIDTH", "command_help", "main", "shipped_text"]

#: the columns the shipped help is written for (argparse reads them from ``COLUMNS``)
WIDTH = 100


@contextlib.contextmanager
def _as_command(command: str):
    """Run as ``loopalign <command>`` would, at :data:`WIDTH` columns."""
    program, columns = sys.argv[0], os.environ.get("COLUMNS")
    sys.argv[0], os.environ["COLUMNS"] = f"loopalign {command}", str(WIDTH)
    try:
        yield
    finally:
        sys.argv[0] = program
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def command_help(command: str) -> str:
    """What ``loopalign <command> --help-all`` prints: the command's parser's whole help, at :data:`WIDTH` columns."""
    module = importlib.import_module(COMMANDS[command][0])
    out = io.StringIO()
    with _as_command(command), contextlib.redirect_stdout(out):
        try:
            module.main(["--help"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise RuntimeError(f"{command} --help exited with {done.code}") from None
    return out.getvalue()


def _set_by_cpu_default(command: str, inherited: list[str]) -> list[str]:
    """The inherited options (``--name``) that the command's shipped CPU default YAML sets, in its order."""
    path = SHIPPED_CONFIGS / f"{command.replace('-', '_')}_cpu_default.yaml"
    if not path.is_file():
        return []
    keys = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [f"--{k}" for k in keys if f"--{k}" in inherited]


def shipped_text(command: str) -> str:
    """``loopalign <command> --help`` as shipped: :func:`command_help` up to the inherited options, then a note
    naming ``--help-all`` (and the inherited options the command's CPU default sets)."""
    full = command_help(command)
    head = f"\n{INHERITED_SECTION}:\n"
    if head not in full:
        return full
    own, inherited = full.split(head, 1)
    names = [w.rstrip(",") for line in inherited.splitlines() for w in line.split() if w.startswith("--")]
    note = f"`loopalign {command} {HELP_ALL}` lists them (it imports TRL: several seconds)."
    used = _set_by_cpu_default(command, names)
    if used:
        note += " The shipped CPU default sets " + ", ".join(used) + "."
    wrapped = textwrap.fill(note, WIDTH - 2, initial_indent="  ", subsequent_indent="  ")
    return f"{own}{head}{wrapped}\n\noptions:\n  -h, --help            this help\n  {HELP_ALL:<20}  this help and the inherited options\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopalign.scripts.help_text", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for command in COMMANDS:
        text = shipped_text(command)
        if args.check:
            if shipped_help(command) != text:
                stale.append(command)
        else:
            atomic_write_text(HELP_DIR / f"{command}.txt", text)
    if stale:
        print(f"shipped help differs from the parser: {', '.join(stale)} (python -m loopalign.scripts.help_text)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
