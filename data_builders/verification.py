"""``python -m data_builders.verification``: the verification build's command under its older name, the same as
``loopalign build-data`` (:mod:`loopalign.scripts.build_data`). The build itself moved to
:mod:`loopalign.data.verification`; its names stay readable here for one release (``data_builders.verification.X``
is ``loopalign.data.verification.X``)."""

import sys

from loopalign.data import verification as _moved
from loopalign.scripts.build_data import main as _build_data_main

__all__ = [*_moved.__all__, "main"]

PROG = "python -m data_builders.verification"


def main(argv: list[str] | None = None) -> int:
    """``python -m data_builders.verification --source synthetic --n 200 --out DIR`` (= ``loopalign build-data``)."""
    return _build_data_main(argv, prog=PROG)


def __getattr__(name: str):
    return getattr(_moved, name)


if __name__ == "__main__":
    sys.exit(main())
