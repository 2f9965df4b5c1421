"""Moved to :mod:`loopalign.probes` (the one home of probes); this name stays importable for one release."""

import sys

from loopalign import probes as _moved

sys.modules[__name__] = _moved
