"""Shared fixtures: a real gateway process on loopback, started once per session.

The gateway runs as a subprocess (``python -m gateway --config ...``) exactly as
an operator runs it. Its test dialplan routes ``echo``/``tone`` to the embedded
targets, ``sipp<port>`` to a sipp phone listening on ``127.0.0.1:<port>``, and
rejects ``blocked<digits>``; anything else matches nothing (403).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers.gateway import ROOT, Gateway, free_port, start_gateway, stop_gateway

__all__ = ["ROOT", "Gateway", "free_port"]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the whole session (2 workers x 4 calls, test dialplan)."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    try:
        gw.wait_ready()
        yield gw
    finally:
        stop_gateway(gw)
