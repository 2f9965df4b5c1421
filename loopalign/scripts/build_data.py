"""``loopalign build-data``: build a verification dataset (the same command as ``python -m data_builders.verification``;
``--help`` lists the sources and options). Concept-injection builds: ``python -m data_builders.injection``."""

from __future__ import annotations

from loopalign.data.verification import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
