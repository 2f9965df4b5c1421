"""``python -m loopalign <command> [options]``: the ``loopalign`` command (:mod:`loopalign.cli`)."""

import sys

from loopalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
