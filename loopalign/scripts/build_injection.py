"""``loopalign build-injection``: extract concept vectors per (loop, layer) and build concept-injection trial records
(the same command as ``python -m data_builders.injection``; ``--help`` lists the options)."""

from __future__ import annotations

from loopalign.injection.trials import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
