"""Shared fixtures: a real gateway process on loopback, started once per session.

The gateway runs as a subprocess (``python -m gateway --config ...``) exactly as
an operator runs it. Its test dialplan routes ``echo``/``tone`` to the embedded
targets, ``sipp<port>`` to a sipp phone listening on ``127.0.0.1:<port>``, and
rejects ``blocked<digits>``; anything else matches nothing (403).

Every end-to-end test that uses a fixture named ``gateway`` goes through the
leak gate (:mod:`peers.census`): the gateway must hold no more afterwards
(fds, threads, tasks, UDP sockets, calls, peer connections, pjsua call slots,
WebSockets) than before. Tests with a gateway of another name call
:func:`peers.census.warm_baseline` and :func:`peers.census.assert_no_leaks`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers.census import Census, assert_no_leaks, warm_baseline
from peers.gateway import ROOT, Gateway, free_port, start_gateway, stop_gateway

__all__ = ["ROOT", "Gateway", "free_port"]

E2E = Path(__file__).resolve().parent / "e2e"

#: Where the leak gate keeps the baseline it took, on the test's node.
BASELINE = pytest.StashKey[Census]()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the whole session (2 workers x 4 calls, test dialplan), warmed up
    with one echo call on each worker and targets process before the first test."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    try:
        gw.wait_ready()
        warm_baseline(gw)
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(autouse=True)
def leak_gate(request: pytest.FixtureRequest) -> Iterator[None]:
    """End-to-end tests on ``gateway`` leave it holding no more than they found."""
    if "gateway" not in request.fixturenames or E2E not in request.path.parents:
        yield
        return
    gw = request.getfixturevalue("gateway")
    request.node.stash[BASELINE] = warm_baseline(gw)
    yield
    leaks = None
    try:
        assert_no_leaks(gw, request.node.stash[BASELINE], what=request.node.nodeid)
    except AssertionError as exc:
        leaks = str(exc)
    if leaks is not None:
        pytest.fail(leaks, pytrace=False)
