"""Helpers of the repository's own tooling (the documentation build); not shipped."""
