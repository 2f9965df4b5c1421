"""The loop now running, readable from any hook or LoRA layer while a looped layer computes.

Every family sets it inside its looped layers' forward (so it is also right when gradient
checkpointing recomputes that forward during backward); hooks and loop-routed LoRA read it with
:func:`current_loop`. Family-neutral, so each family's modeling file imports it from here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["current_loop", "running_loop"]

#: (loop_index, num_loops) of the looped layer now running, or None outside one.
_CURRENT_LOOP: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("loop", default=None)


def current_loop() -> tuple[int, int] | None:
    """(loop_index, num_loops) of the looped layer being computed (0-based index), or None outside one."""
    return _CURRENT_LOOP.get()


@contextmanager
def running_loop(where: tuple[int, int] | None) -> Iterator[None]:
    """Set :func:`current_loop` to ``where`` (``(loop_index, num_loops)`` or None) for the block."""
    token = _CURRENT_LOOP.set(where)
    try:
        yield
    finally:
        _CURRENT_LOOP.reset(token)
