"""Quotas across connections, end to end: per user, per address, per minute; 200 calls.

Tokens are on. Two sipp phones: one that rings for ever (calls stay live while
a limit is tested) and one that answers 486 at once (a complete call in a
few tens of milliseconds, for the 200). Each limit must trip with its own
``refusal``, no INVITE may leave for a refused call, and once every call has
ended the front's quota counters must all be back to zero.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest
from peers.census import census
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.webclient import WebClient, offer_sdp

pytestmark = pytest.mark.timeout(180)

SECRET = "quota-secret-0123456789abcdef0123456789abcdef"
AUDIENCE = "sipgw-quotas"
PER_USER, PER_IP, USER_PER_MINUTE, IP_PER_MINUTE = 2, 3, 6, 240


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, SECRET, "HS256")


@pytest.fixture
async def setup(tmp_path):
    async with (
        SippPhone("ring", tmp_path / "ring", calls=50) as ring,
        SippPhone("busy", tmp_path / "busy", calls=400) as busy,
    ):
        port = free_port()
        settings = {
            "http": {
                "max_calls_per_user": PER_USER,
                "max_calls_per_ip": PER_IP,
                "calls_per_minute_per_user": USER_PER_MINUTE,
                "calls_per_minute_per_ip": IP_PER_MINUTE,
                "max_call_rate": 1000,
            },
            "auth": {"enabled": True, "secret": SECRET, "audience": AUDIENCE},
            "calls": {"invite_after_ice": False},
        }
        gw = start_gateway(tmp_path, make_config(port, settings=settings), http_port=port)
        try:
            gw.wait_ready()
            yield gw, ring, busy
        finally:
            stop_gateway(gw)


async def connect(gw, sub: str) -> WebClient:
    client = WebClient(gw.url, origin=gw.url)
    await client.connect()
    welcome = await client.request({"type": "hello", "token": token(sub)})
    assert welcome["type"] == "welcome", welcome
    return client


async def call(client: WebClient, call_id: str, to: str, sdp: str) -> dict[str, Any]:
    """A ``call`` request's reply; retried while the workers pace their set-ups
    (``setup_rate``: the gateway asks to try again, and a refused request is not
    counted by any quota)."""
    while True:
        reply = await client.request({"type": "call", "call": call_id, "to": to, "sdp": sdp})
        if reply.get("refusal") != "setup_rate":
            return reply
        await asyncio.sleep(0.05)


async def test_every_quota_trips_with_its_own_refusal_and_returns_to_zero(setup):
    gw, ring, busy = setup
    sdp = await offer_sdp()
    ringing, done = f"sipp{ring.port}", f"sipp{busy.port}"
    alice, alice2, bob = (
        await connect(gw, "alice"),
        await connect(gw, "alice"),
        await connect(gw, "bob"),
    )
    try:
        # Per user, across two connections of the same sub.
        assert (await call(alice, "a1", ringing, sdp))["type"] == "answer"
        assert (await call(alice2, "a2", ringing, sdp))["type"] == "answer"
        refused = await call(alice2, "a3", ringing, sdp)
        assert (refused["code"], refused["refusal"]) == ("busy", "user_call_limit"), refused
        # Per address: bob is the third call from 127.0.0.1, his second is one too many.
        assert (await call(bob, "b1", ringing, sdp))["type"] == "answer"
        refused = await call(bob, "b2", ringing, sdp)
        assert (refused["code"], refused["refusal"]) == ("busy", "address_call_limit"), refused
        await ring.wait_for(lambda r: r.invites == 3, timeout=10)
        for client, call_id in ((alice, "a1"), (alice2, "a2"), (bob, "b1")):
            reply = await client.hangup(call_id)
            assert reply["type"] == "hangup", reply
        # Per user per minute: alice started 2; 4 more complete calls reach 6.
        for i in range(4):
            assert (await call(alice, f"m{i}", done, sdp))["type"] == "answer"
            await alice.wait_message(
                lambda m, i=i: m.get("call") == f"m{i}" and m["type"] == "hangup"
            )
        refused = await call(alice, "m9", done, sdp)
        assert (refused["code"], refused["refusal"]) == ("rate_limited", "user_call_rate"), refused
    finally:
        for client in (alice, alice2, bob):
            await client.close()

    # 200 complete calls from 40 users, 5 each; 7 calls were started before.
    started = 7
    for user in range(40):
        client = await connect(gw, f"user{user}")
        try:
            for i in range(5):
                reply = await call(client, f"c{i}", done, sdp)
                assert reply["type"] == "answer", reply
                ended = await client.wait_message(
                    lambda m, i=i: m.get("call") == f"c{i}" and m["type"] == "hangup"
                )
                assert ended["code"] == 486, ended
                started += 1
        finally:
            await client.close()
    assert started == 207
    report = await busy.wait_for(lambda r: r.invites == 204, timeout=10)
    assert report.invites == 204, report  # 4 of alice's + 200; no refused call got through

    # Per address per minute: the 240th start from 127.0.0.1 is the last one.
    client = None
    try:
        for i in range(IP_PER_MINUTE - started):
            if i % 5 == 0:  # a new user every 5 calls: below the per-user minute
                if client is not None:
                    await client.close()
                client = await connect(gw, f"last{i}")
            reply = await call(client, f"l{i}", done, sdp)
            assert reply["type"] == "answer", (i, reply)
            await client.wait_message(
                lambda m, i=i: m.get("call") == f"l{i}" and m["type"] == "hangup"
            )
        assert client is not None
        await client.close()
        client = await connect(gw, "fresh")
        refused = await call(client, "over", done, sdp)
        assert (refused["code"], refused["refusal"]) == ("rate_limited", "address_call_rate")
    finally:
        if client is not None:
            await client.close()
    front = census(gw)["front"]
    assert front["quota_calls"] == 0 and front["calls"] == 0, front


async def test_a_tokens_max_duration_ends_the_call(setup):
    """``max_duration`` in the token bounds each answered call (config has no bound)."""
    gw, _, _ = setup
    client = WebClient(gw.url, origin=gw.url)
    await client.connect()
    try:
        welcome = await client.request({"type": "hello", "token": token("dora", max_duration=2)})
        assert welcome["type"] == "welcome", welcome
        call = await client.establish("d1", "echo")
        accepted = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
        assert accepted["type"] == "accepted", accepted
        started = time.monotonic()
        hangup = await client.wait_event(call, "hangup", timeout=10)
        assert (hangup["outcome"], hangup["by"]) == ("max_duration", "gateway"), hangup
        assert 1.5 <= time.monotonic() - started <= 4.0
    finally:
        await client.close()
