"""``python -m data_builders.statements``: the statement build's command under its older name, the same as
``loopalign build-statements`` (:mod:`loopalign.scripts.build_statements`). The build itself is
:mod:`loopalign.data.statements`; its names stay readable here (``data_builders.statements.X`` is
``loopalign.data.statements.X``)."""

import sys

from loopalign.data import statements as _moved
from loopalign.scripts.build_statements import main as _build_statements_main

__all__ = [*_moved.__all__, "main"]

PROG = "python -m data_builders.statements"


def main(argv: list[str] | None = None) -> int:
    """``python -m data_builders.statements --per_family 300 --out DIR`` (= ``loopalign build-statements``)."""
    return _build_statements_main(argv, prog=PROG)


def __getattr__(name: str):
    return getattr(_moved, name)


if __name__ == "__main__":
    sys.exit(main())
