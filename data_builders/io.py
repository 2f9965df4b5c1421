"""Moved to :mod:`loopalign.data.io`; this name stays importable for one release (it is the same module)."""

import sys

from loopalign.data import io as _moved

sys.modules[__name__] = _moved
