"""``python -m loopalign_cli <command> [options]``: the ``loopalign`` script without the install, as fast as it
(``python -m loopalign`` imports the package first: seconds before ``--help``)."""

import sys

from loopalign_cli import main

if __name__ == "__main__":
    sys.exit(main())
