"""Model implementations; importing registers them with transformers' Auto classes."""

from . import ouro  # noqa: F401
