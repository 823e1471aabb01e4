"""The leak gate itself: it must fail a test that leaves something behind.

Each test leaves something open on purpose, checks that the gate's own
comparison (:func:`peers.census.assert_no_leaks`, against the baseline the
autouse fixture took) names it, then closes it, so that the fixture's check
after the test passes.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from conftest import BASELINE
from peers.census import assert_no_leaks
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(90)


async def leaks(gateway, request) -> str:
    """The gate's verdict now, given a second to settle: the text of its failure."""
    with pytest.raises(AssertionError) as failure:
        await asyncio.to_thread(assert_no_leaks, gateway, request.node.stash[BASELINE], 1.0)
    return str(failure.value)


async def test_a_websocket_left_open_fails_the_gate(gateway, request):
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{gateway.url}/ws"):
        text = await leaks(gateway, request)
        assert "front (pid " in text and "websockets 0 -> 1 (+1)" in text, text
    # Closed: the fixture's own check after this test must now pass.


async def test_a_call_left_up_fails_the_gate_in_every_process_it_touches(gateway, request):
    async with WebClient(gateway.url) as client:
        call = await client.establish("left-up", "echo")
        await client.wait_event(call, "accepted")
        text = await leaks(gateway, request)
        for line in (
            "websockets 0 -> 1",
            "calls 0 -> 1",
            "call_owners 0 -> 1",
            "worker_slots 0 -> 1",
            "targets_slots 0 -> 1",
            "peer_connections 0 -> 1",
            "pjsua_calls 0 -> 1",
        ):
            assert line in text, (line, text)
        assert text.count("pjsua_calls 0 -> 1") == 2, text  # the worker and the targets
        assert "udp_sockets" in text, text  # RTP on both pjsua legs, ICE on aiortc's
        await client.hangup("left-up")
