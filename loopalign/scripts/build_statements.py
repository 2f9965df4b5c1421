"""``loopalign build-statements``: build true/false statement data (the same command as
``python -m data_builders.statements``; ``--help`` lists the families and options; docs/data.md)."""

from __future__ import annotations

from loopalign.data.statements import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
