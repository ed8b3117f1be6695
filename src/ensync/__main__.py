"""``python -m ensync``: the ``ensync`` command."""

from __future__ import annotations

import sys

from ensync.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
