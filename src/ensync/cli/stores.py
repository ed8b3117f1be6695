"""The store options every command that opens a store shares."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypedDict

__all__ = ["StoreOptions", "store_options"]


class StoreOptions(TypedDict):
    nats_creds: Path | None
    nats_tls_ca: Path | None


def store_options(args: argparse.Namespace) -> StoreOptions:
    """``--nats-creds`` and ``--nats-tls-ca`` as ``open_store`` takes them."""
    creds = getattr(args, "nats_creds", None)
    tls_ca = getattr(args, "nats_tls_ca", None)
    return {
        "nats_creds": Path(creds) if creds else None,
        "nats_tls_ca": Path(tls_ca) if tls_ca else None,
    }
