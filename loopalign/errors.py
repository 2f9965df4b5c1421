"""loopalign's exceptions: one base, :class:`LoopalignError`, and one class per kind of failure, so a caller can
catch what loopalign refused without catching every ``ValueError`` of the stack under it.

Each class also derives from the built-in exception the same failure raised before (``ValueError`` for a bad
setting or record, ``RuntimeError`` for a model or a lock), so ``except ValueError`` keeps working::

    try:
        GapSFTConfig(output_dir="out", loss_weights={"lm": -1.0})
    except ConfigError as e:            # also a ValueError
        ...

- :class:`ConfigError`: a setting is invalid (a config dataclass, a command-line option).
- :class:`DataError`: a record, a dataset or a data source is invalid or cannot be read.
- :class:`ModelError`: a model cannot be loaded, routed, merged or read at a site.
- :class:`LockError`: a folder or a build is held by another process (:class:`LockTimeoutError`: gave up waiting).
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "LockError", "LockTimeoutError", "LoopalignError", "ModelError"]


class LoopalignError(Exception):
    """The base of every exception loopalign raises on purpose."""


class ConfigError(LoopalignError, ValueError):
    """A setting is invalid: a config dataclass field, or a command-line option."""


class DataError(LoopalignError, ValueError):
    """A record, dataset or data source is invalid or cannot be read."""


class ModelError(LoopalignError, RuntimeError):
    """A model cannot be loaded, routed by loop, merged, or read at a site."""


class LockError(LoopalignError, RuntimeError):
    """A folder or a build is held by another process."""


class LockTimeoutError(LockError, TimeoutError):
    """Gave up waiting for a lock another process holds."""
