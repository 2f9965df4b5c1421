"""The ``loopalign`` command's dispatcher: ``loopalign <command> [options]`` runs the same code as
``python recipes/<name>.py``.

loopalign --help                        # the commands, one line each
loopalign --version
loopalign sft-gap --help                # the command's own options (loopalign's; YAML with --config)
loopalign sft-gap --help-all            # and the options it inherits from TRL and transformers
loopalign eval-gap --model_name_or_path tiny --eval_loops 1-4
python -m loopalign eval-gap ...        # the same without the installed script

A top-level module of the standard library only, outside the ``loopalign`` package: importing ``loopalign``
registers Ouro with transformers (torch, transformers and TRL: 6-8 s on a CPU), which the answers above do not need.
``--version`` and ``--help`` answer from here; a command's ``--help`` prints its help as shipped in
``loopalign_cli/help/<command>.txt``, written from the command's own parser by
``python -m loopalign.scripts.help_text`` and kept equal to it by ``tests/test_cli.py``. Everything else (the
command itself, ``--help-all``) imports the command's module and runs its ``main``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["COMMANDS", "HELP_ALL", "HELP_DIR", "installed_version", "main", "shipped_help", "usage"]

#: command -> (module with ``main(argv)``, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "sft-gap": ("loopalign.scripts.sft_gap", "gap SFT: LoRA so SV catches up with RR per loop, before/after verdict"),
    "eval-gap": ("loopalign.scripts.eval_gap", "SV / RR / gap (and TP) per loop for a model and dataset"),
    "ablate-gap": (
        "loopalign.scripts.ablate_gap",
        "the gap-SFT objective's variants x seeds (the organism, or any model after --)",
    ),
    "ouro-loops": ("loopalign.scripts.ouro_loops", "per-loop loss, answer accuracy and exit probability"),
    "organism": ("loopalign.scripts.pretrain_organism", "build (or reuse) the CPU model organism, print its card"),
    "build-data": (
        "loopalign.scripts.build_data",
        "build a verification dataset (python -m data_builders.verification)",
    ),
    "build-statements": (
        "loopalign.scripts.build_statements",
        "build true/false statement data by family, split by entity (python -m data_builders.statements)",
    ),
    "build-injection": (
        "loopalign.scripts.build_injection",
        "extract concept vectors and build concept-injection trials (python -m data_builders.injection)",
    ),
    "eval-introspection": ("loopalign.scripts.eval_introspection", "concept-injection introspection per loop"),
    "grpo-introspection": ("loopalign.scripts.grpo_introspection", "GRPO / SFT training for introspection"),
}

#: the shipped help of each command: ``<command>.txt``
HELP_DIR = Path(__file__).resolve().parent / "help"
#: the option that prints a command's whole help, the options inherited from TRL and transformers included
HELP_ALL = "--help-all"
_HELP = ("-h", "--help")


def installed_version() -> str:
    """The installed distribution's version ("not installed" when run from a source tree without ``pip install``)."""
    try:
        return version("loopalign")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return (
        "usage: loopalign <command> [options]   (loopalign <command> --help: the command's options, "
        f"{HELP_ALL}: with those inherited from TRL and transformers; loopalign --version)\n\n"
        "commands:\n" + "\n".join(lines) + "\n"
    )


def shipped_help(command: str) -> str | None:
    """``loopalign <command> --help`` as shipped (``HELP_DIR/<command>.txt``), or None when there is none."""
    path = HELP_DIR / f"{command}.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _options(rest: Sequence[str]) -> list[str]:
    """The command's own arguments: those before a ``--`` (after it they belong to another command)."""
    rest = list(rest)
    return rest[: rest.index("--")] if "--" in rest else rest


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``): its first item names the command, the rest go to the
    command's ``main``. -> exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"loopalign {installed_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"loopalign: unknown command {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    own = _options(rest)
    if any(a in _HELP for a in own) and HELP_ALL not in own:
        text = shipped_help(name)
        if text is not None:
            print(text, end="")
            return 0
    if HELP_ALL in own:  # the command's parser prints everything
        cut = len(own)
        rest = [("--help" if a == HELP_ALL else a) for a in own] + list(rest[cut:])
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):  # a missing dependency of the command, not it
            raise
        print(
            f"loopalign: command {name!r} is not available in this install (no module {module_name})", file=sys.stderr
        )
        return 2
    program = sys.argv[0]
    sys.argv[0] = f"loopalign {name}"  # the command's usage line and errors say `loopalign <command>`
    try:
        status = module.main(rest)
    finally:
        sys.argv[0] = program
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
