"""Model implementations; importing registers them with transformers' Auto classes."""

from . import huginn, ouro  # noqa: F401
