"""``python -m data_builders.statements``: true/false statement builds; the same module as
:mod:`loopalign.data.statements` (see there)."""

import sys

from loopalign.data import statements as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
