"""The ``loopalign`` command under the package's name: ``python -m loopalign <command>`` and
``from loopalign import cli``. The command table and the dispatcher live in :mod:`loopalign_cli` (the standard
library only, so that the installed ``loopalign`` script answers ``--version`` and ``--help`` without importing
torch); this module is that dispatcher, reached through the package.
"""

from __future__ import annotations

import sys

from loopalign_cli import COMMANDS, HELP_ALL, installed_version, main, shipped_help, usage

__all__ = ["COMMANDS", "HELP_ALL", "installed_version", "main", "shipped_help", "usage"]

if __name__ == "__main__":
    sys.exit(main())
