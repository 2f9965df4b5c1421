"""loopalign's messages go through :mod:`logging`, under the ``loopalign`` logger (transformers' convention).

A library user sees what loopalign says (which build it reuses, whom a lock waits for, how many rows a table kept)
once logging is configured, as for any library; the commands (``loopalign <command>``, ``recipes/*.py``,
``python -m data_builders...``) show INFO and above on standard output, where their own results go::

    import logging
    logging.basicConfig(level=logging.INFO)            # or only loopalign's: enable_console()
    from loopalign.log import enable_console

``LOOPALIGN_VERBOSITY`` (debug, info, warning, error) sets the commands' level.
"""

from __future__ import annotations

import logging
import os
import sys

from loopalign.errors import ConfigError

__all__ = ["ROOT_LOGGER", "VERBOSITY_ENV", "command_console", "enable_console", "get_logger"]

#: the logger every module's logger descends from
ROOT_LOGGER = "loopalign"
#: environment variable: the level the commands show (debug, info, warning, error)
VERBOSITY_ENV = "LOOPALIGN_VERBOSITY"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (pass ``__name__``), a child of ``loopalign``'s."""
    return logging.getLogger(name if name == ROOT_LOGGER or name.startswith(ROOT_LOGGER + ".") else ROOT_LOGGER)


class _StdoutHandler(logging.StreamHandler):
    """Writes each record to ``sys.stdout`` as it is when the record is emitted, so a redirection made after the
    handler (pytest's capture, ``contextlib.redirect_stdout``) sees the messages in order with printed output."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property above always reads sys.stdout
        pass


def enable_console(level: int | None = None) -> logging.Logger:
    """Show loopalign's messages at ``level`` (default INFO, or ``LOOPALIGN_VERBOSITY``) and above on standard
    output, as bare lines; idempotent (one handler however often it is called). -> the ``loopalign`` logger."""
    logger = logging.getLogger(ROOT_LOGGER)
    if level is None:
        name = os.environ.get(VERBOSITY_ENV, "info").strip().lower()
        if name not in _LEVELS:
            raise ConfigError(f"{VERBOSITY_ENV} must be one of {sorted(_LEVELS)}, got {name!r}")
        level = _LEVELS[name]
    logger.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def command_console() -> logging.Logger:
    """:func:`enable_console` for a command's ``main``: a bad ``LOOPALIGN_VERBOSITY`` ends the command with one line
    on stderr and exit status 2, as a bad option does, not a traceback."""
    try:
        return enable_console()
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")  # the command's usage error, before any logger exists to say it
        raise SystemExit(2) from None
