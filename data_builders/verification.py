"""Moved to :mod:`loopalign.data.verification`; this name stays importable for one release (it is the same module)."""

import sys

from loopalign.data import verification as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
