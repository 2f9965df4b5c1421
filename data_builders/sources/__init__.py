"""Moved to :mod:`loopalign.data.sources`; these names stay importable for one release (the same modules)."""

import sys

from loopalign.data import sources as _moved
from loopalign.data.sources import base, digits, gsm8k, math, safety, synthetic

for _module in (base, digits, gsm8k, math, safety, synthetic):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
sys.modules[__name__] = _moved
