"""The TCP proxy tests cut and restore: :mod:`ensync.testing.proxy`."""

from __future__ import annotations

from ensync.testing.proxy import TcpProxy, tcp_proxy

__all__ = ["TcpProxy", "tcp_proxy"]
