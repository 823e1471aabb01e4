"""The browser as a PBX extension: it registers through the gateway and takes calls.

Kamailio is the registrar and proxy (digest auth, usrloc in memory); a pjsua2
phone registered as 1002 is the caller; the aiortc client registers as 1001.
Everything goes through Kamailio the way it would through Asterisk.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from peers.gateway import Gateway, free_port, make_config, start_gateway, stop_gateway
from peers.kamailio import Kamailio
from peers.pjsua_phone import PjsuaPhone, SipAccount
from peers.sipp import SippPhone, parse_message_log
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)

USERS = {"1001": "secret1", "1002": "secret2"}
RING_TIMEOUT = 4.0
#: Extensions 1000-1099 are on the PBX.
PBX_RULE = """
[[dialplan.rules]]
name = "pbx"
regex = "10[0-9][0-9]"
target = "sip:{number}@{registrar}"
"""
PHONE_HZ = 700
BROWSER_HZ = 1000

#: Every message the browser got in this module's tests, and the PBX's addresses.
_SEEN: list[str] = []
_PBX_ADDRESSES: set[str] = set()
_close = WebClient.close


async def _close_and_keep(self: WebClient) -> None:
    _SEEN.extend(json.dumps(m) for m in self.messages)
    await _close(self)


@pytest.fixture(autouse=True)
def no_secret_reaches_the_browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test: no password, digest response, nonce or PBX address appeared
    in any message to the browser (credentials never travel back; errors do not
    quote the registrar's responses)."""
    monkeypatch.setattr(WebClient, "close", _close_and_keep)
    _SEEN.clear()
    _PBX_ADDRESSES.clear()
    yield
    secrets = [*USERS.values(), "nonce", "Digest ", "response=", *_PBX_ADDRESSES]
    leaks = [(secret, text[:200]) for text in _SEEN for secret in secrets if secret in text]
    assert not leaks, leaks
    assert _SEEN or not _PBX_ADDRESSES, "the scan saw no message"


@asynccontextmanager
async def pbx(
    tmp_path: Any,
    registrar: dict[str, Any] | None = None,
    settings: dict[str, dict[str, object]] | None = None,
    extra: str = "",
    **options: Any,
) -> AsyncIterator[tuple[Kamailio, Gateway]]:
    """Kamailio, and a gateway registering to it (its own process: the registrar differs)."""
    async with Kamailio(tmp_path, USERS, **options) as kam:
        _PBX_ADDRESSES.add(kam.registrar.split(":", 1)[1].split(";", 1)[0])
        port = free_port()
        settings = {
            "registrar": {
                "uri": kam.registrar,
                "domain": kam.realm,
                "ring_timeout": RING_TIMEOUT,
                **(registrar or {}),
            },
            **(settings or {}),
        }
        text = make_config(port, settings=settings) + PBX_RULE + extra
        gw = start_gateway(tmp_path, text, http_port=port)
        try:
            await asyncio.to_thread(gw.wait_ready)
            yield kam, gw
        finally:
            await asyncio.to_thread(stop_gateway, gw)


@asynccontextmanager
async def caller(tmp_path: Any, kam: Kamailio, **options: Any) -> AsyncIterator[PjsuaPhone]:
    account = SipAccount("1002", USERS["1002"], kam.registrar, domain=kam.realm)
    async with PjsuaPhone(tmp_path, tone_hz=PHONE_HZ, account=account, **options) as phone:
        await phone.wait_registered()
        yield phone


async def registered(client: WebClient, user: str = "1001", password: str = "secret1") -> None:
    reply = await client.request({"type": "register", "user": user, "password": password})
    assert (reply["type"], reply["user"]) == ("registered", user), reply
    assert reply["expires"] > 0


async def test_register_incoming_call_and_tones_both_ways(tmp_path):
    async with pbx(tmp_path) as (kam, gw), WebClient(gw.url) as client:
        await registered(client)
        assert kam.log().replies("REGISTER", "1001") == [401, 200]
        assert await kam.contacts("1001")
        async with caller(tmp_path, kam) as phone:
            await phone.call(f"sip:1001@{kam.realm}")
            incoming = await client.wait_message(lambda m: m["type"] == "incoming", 10)
            assert incoming["from"].startswith("sip:1002@"), incoming
            assert incoming["to"].startswith("sip:1001@"), incoming
            assert "opus/48000" in incoming["sdp"]
            call = await client.accept(incoming, tone_hz=BROWSER_HZ)
            accepted = await client.wait_event(call, ("accepted", "hangup"), 10)
            assert accepted["type"] == "accepted", accepted
            await phone.wait_confirmed()
            tone = await call.wait_for_tone(PHONE_HZ)
            assert abs(tone.hz - PHONE_HZ) <= 10 and tone.rms > 0.03, tone
            heard = await phone.wait_for_tone(BROWSER_HZ)
            assert abs(heard.hz - BROWSER_HZ) <= 10 and heard.rms > 0.03, heard
            reply = await client.hangup(call.call_id)
            assert (reply["type"], reply["outcome"]) == ("hangup", "local_bye"), reply
            await phone.wait_disconnected()


async def test_caller_cancels_before_the_answer(tmp_path):
    async with pbx(tmp_path) as (kam, gw), WebClient(gw.url) as client:
        await registered(client)
        async with caller(tmp_path, kam) as phone:
            await phone.call(f"sip:1001@{kam.realm}")
            incoming = await client.wait_message(lambda m: m["type"] == "incoming", 10)
            await phone.hangup()
            hangup = await client.wait_message(
                lambda m: m["type"] == "hangup" and m["call"] == incoming["call"], 10
            )
            assert (hangup["outcome"], hangup["code"], hangup["by"]) == (
                "remote_cancel",
                487,
                "remote",
            )
            late = await client.request({"type": "accept", "call": incoming["call"], "sdp": "x"})
            assert late["code"] in ("wrong_state", "not_found"), late


async def test_reject_and_no_answer_reach_the_caller(tmp_path):
    async with pbx(tmp_path) as (kam, gw), WebClient(gw.url) as client:
        await registered(client)
        async with caller(tmp_path, kam) as phone:
            await phone.call(f"sip:1001@{kam.realm}")
            incoming = await client.wait_message(lambda m: m["type"] == "incoming", 10)
            await client.send({"type": "reject", "call": incoming["call"], "code": 486})
            gone = await phone.wait_disconnected()
            assert gone["code"] == 486, gone

            start = len(client.messages)
            mark = len(phone.events)
            await phone.call(f"sip:1001@{kam.realm}")
            incoming = await client.wait_message(lambda m: m["type"] == "incoming", 10, start)
            t0 = time.monotonic()
            hangup = await client.wait_message(
                lambda m: m["type"] == "hangup" and m["call"] == incoming["call"],
                RING_TIMEOUT + 5,
                start,
            )
            assert RING_TIMEOUT - 0.5 <= time.monotonic() - t0 <= RING_TIMEOUT + 2
            assert (hangup["outcome"], hangup["code"]) == ("no_answer", 480), hangup
            gone = await phone.wait_event("disconnected", 10, mark)
            assert gone["code"] == 480, gone


async def test_two_tabs_ring_and_the_first_accept_wins(tmp_path):
    async with (
        pbx(tmp_path) as (kam, gw),
        WebClient(gw.url) as first,
        WebClient(gw.url) as second,
    ):
        await registered(first)
        await registered(second)  # shares the registration
        assert len(kam.log().replies("REGISTER", "1001")) == 2  # one 401, one 200
        async with caller(tmp_path, kam) as phone:
            await phone.call(f"sip:1001@{kam.realm}")
            ring1 = await first.wait_message(lambda m: m["type"] == "incoming", 10)
            ring2 = await second.wait_message(lambda m: m["type"] == "incoming", 10)
            assert ring1["call"] == ring2["call"]
            call = await second.accept(ring2, tone_hz=BROWSER_HZ)
            elsewhere = await first.wait_message(lambda m: m["type"] == "hangup", 10)
            assert elsewhere["outcome"] == "answered_elsewhere", elsewhere
            await second.wait_event(call, "accepted", 10)
            tone = await call.wait_for_tone(PHONE_HZ)
            assert abs(tone.hz - PHONE_HZ) <= 10 and tone.rms > 0.03, tone
            await second.hangup(call.call_id)
            await phone.wait_disconnected()


async def test_wrong_password_fails_once_and_is_not_retried(tmp_path):
    async with pbx(tmp_path) as (kam, gw), WebClient(gw.url) as client:
        reply = await client.request(
            {"type": "register", "user": "1001", "password": "wrong"}, timeout=15
        )
        assert reply["type"] == "registration_failed", reply
        assert reply["code"] in (401, 403), reply
        await asyncio.sleep(3)
        attempts = kam.log().replies("REGISTER", "1001")
        assert attempts.count(200) == 0 and len(attempts) <= 3, attempts
        again = await client.request({"type": "register", "user": "1001", "password": "secret1"})
        assert again["type"] == "registered", again


async def test_a_challenge_in_another_realm_gets_no_digest(tmp_path):
    """The password is for ``registrar.realm`` only: Kamailio's 401 names its own
    realm, so with another one configured the gateway must not answer it (with
    pjsip's usual realm "*" it would send a digest of the password to anyone)."""
    async with pbx(tmp_path, registrar={"realm": "elsewhere.example"}) as (kam, gw):
        async with WebClient(gw.url) as client:
            reply = await client.request(
                {"type": "register", "user": "1001", "password": "secret1"}
            )
            assert (reply["type"], reply["code"]) == ("registration_failed", 401), reply
        registers = [m for m in kam.log().messages if m.method == "REGISTER"]
        assert registers, kam.log().describe()[-2000:]
        assert not [m for m in registers if m.header("Authorization")], registers


async def test_refresh_before_expiry_and_unregister_when_the_socket_closes(tmp_path):
    async with pbx(tmp_path, max_expires=10, min_expires=5, default_expires=10) as (kam, gw):
        client = WebClient(gw.url)
        await client.connect()
        try:
            await registered(client)
            twice = await client.request({"type": "register", "user": "1001", "password": "x"})
            assert twice["code"] == "wrong_state", twice
            # The registrar grants 10 s: pjsip refreshes before that.
            await kam.wait_log(lambda log: log.replies("REGISTER", "1001").count(200) >= 2, 15)
            assert await kam.contacts("1001")
        finally:
            await client.close()
        deadline = time.monotonic() + 10
        while await kam.contacts("1001"):
            assert time.monotonic() < deadline, "the registration outlived its WebSocket"
            await asyncio.sleep(0.2)


async def test_registered_browser_calls_an_extension_as_itself(tmp_path):
    # Kamailio challenges every INVITE that is not from a trusted source (407):
    # the call must come from 1001's account, with its credentials.
    async with pbx(tmp_path) as (kam, gw), WebClient(gw.url) as client:
        await registered(client)
        async with caller(tmp_path, kam) as phone:
            call = await client.establish("c1", "1002", tone_hz=BROWSER_HZ)
            accepted = await client.wait_event(call, ("accepted", "hangup"), 15)
            assert accepted["type"] == "accepted", accepted
            await phone.wait_confirmed()
            log = kam.log()
            assert log.replies("INVITE", "1001")[:1] == [407], log.describe()[-3000:]
            assert log.forwarded("INVITE", "1002")
            invite = next(m for m in log.messages if m.method == "INVITE")
            assert "sip:1001@" in invite.header("From"), invite.header("From")
            tone = await call.wait_for_tone(PHONE_HZ)
            assert abs(tone.hz - PHONE_HZ) <= 10 and tone.rms > 0.03, tone
            heard = await phone.wait_for_tone(BROWSER_HZ)
            assert abs(heard.hz - BROWSER_HZ) <= 10 and heard.rms > 0.03, heard
            await client.hangup("c1")
            await phone.wait_disconnected()


async def test_early_media_through_the_registrar_is_heard_before_the_answer(tmp_path):
    """The phone answers 183 with SDP and plays its tone 5 s before its 200 OK:
    the browser hears it through Kamailio while the call is still ringing."""
    async with pbx(tmp_path) as (kam, gw), WebClient(gw.url) as client:
        await registered(client)
        async with caller(tmp_path, kam, early_media=True, answer_delay_ms=5000) as phone:
            call = await client.establish("c1", "1002", tone_hz=BROWSER_HZ)
            progress = await client.wait_event(call, ("progress", "hangup"), 15)
            assert (progress["type"], progress["code"]) == ("progress", 183), progress
            tone = await call.wait_for_tone(PHONE_HZ, 4.0)
            assert abs(tone.hz - PHONE_HZ) <= 10 and tone.rms > 0.03, tone
            assert not [e for e in call.events if e["type"] in ("accepted", "hangup")], call.events
            log = kam.log()
            assert [m for m in log.messages if m.method == "INVITE" and "1002" in m.ruri]
            accepted = await client.wait_event(call, ("accepted", "hangup"), 15)
            assert accepted["type"] == "accepted", accepted
            await client.hangup("c1")
            await phone.wait_disconnected()


@pytest.mark.timeout(90)
async def test_registrar_that_never_answers_fails_with_408(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        port = free_port()
        settings = {"registrar": {"uri": f"sip:127.0.0.1:{hole.getsockname()[1]}"}}
        gw = start_gateway(tmp_path, make_config(port, settings=settings), http_port=port)
        try:
            await asyncio.to_thread(gw.wait_ready)
            async with WebClient(gw.url) as client:
                start = time.monotonic()
                reply = await client.request(
                    {"type": "register", "user": "1001", "password": "pw"}, timeout=45
                )
                elapsed = time.monotonic() - start
                assert (reply["type"], reply["code"]) == ("registration_failed", 408), reply
                assert elapsed < 40, elapsed  # pjsip's transaction timeout, 32 s
        finally:
            await asyncio.to_thread(stop_gateway, gw)


SECRET = "a-secret-for-the-account-binding-test-0123456789"
AUDIENCE = "sipgw-register-test"
#: 1001 is a server-side account: its password stays on the gateway, and only
#: tokens for alice (or the account's own name) may register it.
BOUND_ACCOUNT = """
[[accounts]]
user = "1001"
password = "secret1"
subs = ["alice"]
"""


def token_for(sub: str) -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 120}
    return str(jwt.encode(claims, SECRET, "HS256"))


async def test_a_server_side_account_registers_only_for_its_token_subjects(tmp_path):
    auth = {
        "auth": {"enabled": True, "secret": SECRET, "audience": AUDIENCE, "allow_non_browser": True}
    }
    async with pbx(tmp_path, settings=auth, extra=BOUND_ACCOUNT) as (kam, gw):
        async with WebClient(gw.url) as bob:
            hello = await bob.request({"type": "hello", "token": token_for("bob")})
            assert hello["type"] == "welcome", hello
            refused = await bob.request({"type": "register", "user": "1001"})
            assert (refused["type"], refused["code"]) == ("error", "forbidden"), refused
            # A password does not help: the account's binding decides.
            refused = await bob.request({"type": "register", "user": "1001", "password": "x"})
            assert (refused["type"], refused["code"]) == ("error", "forbidden"), refused
            assert kam.log().replies("REGISTER", "1001") == []  # nothing reached the PBX
        async with WebClient(gw.url) as alice:
            hello = await alice.request({"type": "hello", "token": token_for("alice")})
            assert hello["type"] == "welcome", hello
            reply = await alice.request({"type": "register", "user": "1001"})
            assert (reply["type"], reply["user"]) == ("registered", "1001"), reply
            assert kam.log().replies("REGISTER", "1001") == [401, 200]


@pytest.mark.parametrize(
    ("bye_realm", "answered"),
    [("evil.example", False), ("sipgw.test", True)],
    ids=["foreign-realm", "registrar-realm"],
)
async def test_a_407_on_the_bye_gets_a_digest_only_in_the_registrar_realm(
    tmp_path, bye_realm, answered
):
    """The far end of a call challenges the gateway's BYE. Only a challenge in
    ``registrar.realm`` is answered with the user's digest; a foreign realm's 407
    gets nothing to crack offline (and the call still ends for the browser)."""
    async with SippPhone("pbx_bye_challenge", tmp_path, bye_realm=bye_realm) as sip_pbx:
        port = free_port()
        registrar = {"uri": f"sip:127.0.0.1:{sip_pbx.port}", "domain": "sipgw.test"}
        text = make_config(port, settings={"registrar": registrar}) + PBX_RULE
        gw = start_gateway(tmp_path, text, http_port=port)
        try:
            await asyncio.to_thread(gw.wait_ready)
            async with WebClient(gw.url) as client:
                await registered(client)
                call = await client.establish("c1", "1003", tone_hz=BROWSER_HZ)
                accepted = await client.wait_event(call, ("accepted", "hangup"), 15)
                assert accepted["type"] == "accepted", accepted
                reply = await client.hangup("c1")
                assert (reply["type"], reply["outcome"]) == ("hangup", "local_bye"), reply
                await asyncio.sleep(4.5)  # the scenario waits 4 s for a second BYE
        finally:
            await asyncio.to_thread(stop_gateway, gw)
        received = [m for m in parse_message_log(sip_pbx.read_log()) if m.direction == "received"]
        registers = [m for m in received if m.method == "REGISTER"]
        assert any('realm="sipgw.test"' in m.headers.get("authorization", "") for m in registers)
        byes = {m.headers["cseq"]: m for m in received if m.method == "BYE"}
        with_digest = [m for m in byes.values() if "proxy-authorization" in m.headers]
        if answered:
            assert len(byes) == 2 and len(with_digest) == 1, byes
            assert f'realm="{bye_realm}"' in with_digest[0].headers["proxy-authorization"]
        else:
            assert len(byes) == 1 and not with_digest, byes
