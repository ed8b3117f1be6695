"""The one place the version of ensync is written (pyproject.toml reads it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
