"""No call outlives its media: every wait is bounded, every lost leg ends both legs.

One gateway with short bounds (``strict``) carries most cases: ICE/DTLS must
connect within 3 s, a silent leg ends the call after 8 s, ringing after 3 s,
consent after 5 s, a WebSocket that stops answering pings after 2 s. The
browser is the aiortc client of :mod:`peers.webclient` (stock, or with its ICE
crippled the way real clients fail) or an offer made by headless Chromium; the
phone is sipp. Each test checks the outcome the browser heard, how long it
took, and what the phone saw (no INVITE, a CANCEL, a BYE).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from peers.gateway import Gateway, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone, parse_message_log
from peers.webclient import ClientCall, WebClient

pytestmark = pytest.mark.timeout(120)

SETUP_TIMEOUT = 3.0
MEDIA_TIMEOUT = 8.0
MAX_RINGING = 3.0
CONSENT_TIMEOUT = 5.0
HEARTBEAT = 2.0

STRICT = {
    "calls": {
        "setup_timeout": SETUP_TIMEOUT,
        "media_timeout": MEDIA_TIMEOUT,
        "max_ringing": MAX_RINGING,
    },
    "webrtc": {"consent_timeout": CONSENT_TIMEOUT},
    "http": {"heartbeat": HEARTBEAT},
    "sip": {"session_expires": 90, "min_se": 90},
}


def _own_gateway(tmp_path: Any, settings: dict[str, dict[str, object]]) -> Iterator[Gateway]:
    from peers.gateway import free_port

    port = free_port()
    gw = start_gateway(tmp_path, make_config(port, settings=settings), http_port=port)
    try:
        gw.wait_ready()
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _own_gateway(tmp_path_factory.mktemp("strict"), STRICT)


def number(phone: SippPhone) -> str:
    return f"sipp{phone.port}"


def ice_connection(call: ClientCall) -> Any:
    """The aioice connection under the client's peer connection."""
    return call.pc.getTransceivers()[0].sender.transport.transport._connection


async def hangup_within(
    client: WebClient, call: ClientCall, low: float, high: float
) -> dict[str, Any]:
    """The call's ``hangup``, asserted to come between ``low`` and ``high`` s from now."""
    start = time.monotonic()
    hangup = await client.wait_event(call, "hangup", timeout=high + 5)
    elapsed = time.monotonic() - start
    print(f"detected: {hangup.get('outcome')} after {elapsed:.2f} s (window {low}-{high} s)")
    assert low <= elapsed <= high, (elapsed, hangup)
    return hangup


# --- ICE and DTLS never come up: no phone rings --------------------------------------


async def test_browser_that_never_applies_the_answer_gets_ice_failed(strict, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.call("c1", number(phone))
        await client.wait_event(call, "answer")  # ... and never applied: no checks at all
        hangup = await hangup_within(client, call, SETUP_TIMEOUT - 0.5, SETUP_TIMEOUT + 2)
        assert (hangup["outcome"], hangup["code"], hangup["by"]) == ("ice_failed", 480, "gateway")
        assert (await phone.report()).invites == 0  # no phone ever rang


async def test_client_that_never_nominates_gets_ice_failed(strict, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.call("c1", number(phone))
        # Checks succeed both ways, but USE-CANDIDATE is never sent: the
        # gateway (ICE-controlled) waits for a nomination that never comes.
        connection = ice_connection(call)
        build = type(connection).build_request
        connection.build_request = lambda pair, nominate: build(connection, pair, False)
        answer = await client.wait_event(call, "answer")
        from aiortc import RTCSessionDescription

        await call.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        hangup = await hangup_within(client, call, SETUP_TIMEOUT - 0.5, SETUP_TIMEOUT + 2)
        assert hangup["outcome"] == "ice_failed", hangup
        assert (await phone.report()).invites == 0


async def test_trickle_offer_without_candidates_or_end_of_candidates_is_bounded(strict, tmp_path):
    from test_hostile_corpus import chromium_offer

    offer = await chromium_offer()  # Chromium's pc is gone: whatever it offered is dead
    assert "a=end-of-candidates" not in offer
    async with SippPhone("echo", tmp_path) as phone, WebClient(strict.url) as client:
        start = len(client.messages)
        await client.send({"type": "call", "call": "c1", "to": number(phone), "sdp": offer})
        answer = await client.wait_message(lambda m: m.get("call") == "c1", 10, start)
        assert answer["type"] == "answer", answer
        t0 = time.monotonic()
        hangup = await client.wait_message(
            lambda m: m.get("call") == "c1" and m["type"] == "hangup", SETUP_TIMEOUT + 5, start
        )
        assert SETUP_TIMEOUT - 0.5 <= time.monotonic() - t0 <= SETUP_TIMEOUT + 2
        assert hangup["outcome"] == "ice_failed", hangup
        assert (await phone.report()).invites == 0


async def test_dead_candidates_with_invite_at_once_send_cancel(tmp_path):
    """``invite_after_ice = false``: the phone rings at once, then gets a CANCEL."""
    settings = {"calls": {"setup_timeout": SETUP_TIMEOUT, "invite_after_ice": False}}
    for gw in _own_gateway(tmp_path, settings):
        async with SippPhone("ring", tmp_path) as phone, WebClient(gw.url) as client:
            call = await client.call("c1", number(phone))
            await client.wait_event(call, "answer")  # never applied
            await client.wait_event(call, "ringing", timeout=5)
            hangup = await hangup_within(client, call, 0, SETUP_TIMEOUT + 2)
            assert hangup["outcome"] == "ice_failed", hangup
            report = await phone.wait_for(lambda r: r.cancels == 1, timeout=5)
            assert report.invites == 1


# --- the WebRTC leg is lost after set-up ----------------------------------------------


async def test_consent_expiry_ends_the_sip_leg_with_bye(strict, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        assert (await call.wait_for_tone(1000)).rms > 0.02
        # The browser's network goes: its ICE sockets close without a word,
        # while its WebSocket stays up.
        for protocol in ice_connection(call)._protocols:
            protocol.transport.close()
        hangup = await hangup_within(client, call, CONSENT_TIMEOUT * 0.7, CONSENT_TIMEOUT + 4)
        assert hangup["outcome"] == "webrtc_lost", hangup
        assert hangup["by"] == "gateway"
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_browser_dtls_close_ends_the_sip_leg_with_bye(strict, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        await call.pc.close()  # DTLS close_notify, then the ICE sockets close
        hangup = await hangup_within(client, call, 0, 3)
        assert hangup["outcome"] == "webrtc_lost", hangup
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_browser_that_stops_sending_audio_gets_media_timeout(strict, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        sender = call.pc.getSenders()[0]
        sender.replaceTrack(None)  # no more RTP; ICE consent keeps going
        hangup = await hangup_within(client, call, MEDIA_TIMEOUT - 1.5, MEDIA_TIMEOUT + 3)
        assert hangup["outcome"] == "media_timeout", hangup
        assert "browser" in hangup["reason"]
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_silent_websocket_is_closed_and_its_call_ended(strict, tmp_path):
    async with SippPhone("echo", tmp_path) as phone:
        client = WebClient(strict.url, autoping=False)  # never answers the gateway's pings
        await client.connect()
        try:
            call = await client.establish("c1", number(phone))
            await client.wait_event(call, "accepted")
            start = time.monotonic()
            await phone.wait_for(lambda r: r.byes == 1, timeout=2 * HEARTBEAT + 3)
            assert time.monotonic() - start <= 2 * HEARTBEAT + 1
        finally:
            await client.close()


# --- the SIP leg: ringing for ever, answering late ------------------------------------


async def test_phone_ringing_for_ever_is_cancelled_with_no_answer(strict, tmp_path):
    async with SippPhone("ring", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "ringing")
        hangup = await hangup_within(client, call, MAX_RINGING - 0.5, MAX_RINGING + 2)
        assert (hangup["outcome"], hangup["code"], hangup["by"]) == ("no_answer", 480, "gateway")
        await phone.wait_for(lambda r: r.cancels == 1, timeout=5)


@pytest.mark.timeout(150)
async def test_late_answer_after_45_seconds_of_ringing_carries_audio(gateway, tmp_path):
    async with (
        SippPhone("late", tmp_path, answer_after_ms=45_000) as phone,
        WebClient(gateway.url) as client,
    ):
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "ringing")
        start = time.monotonic()
        await client.wait_event(call, "accepted", timeout=60)
        assert time.monotonic() - start >= 44
        tone = await call.wait_for_tone(1000)
        assert abs(tone.hz - 1000) <= 10 and tone.rms > 0.02, tone
        await client.hangup("c1")
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_max_duration_hangs_up_with_bye(tmp_path):
    for gw in _own_gateway(tmp_path, {"calls": {"max_duration": 2.0}}):
        async with SippPhone("echo", tmp_path) as phone, WebClient(gw.url) as client:
            call = await client.establish("c1", number(phone))
            await client.wait_event(call, "accepted")
            hangup = await hangup_within(client, call, 1.5, 4)
            assert (hangup["outcome"], hangup["by"]) == ("max_duration", "gateway")
            await phone.wait_for(lambda r: r.byes == 1, timeout=5)


# --- RFC 4028 session timers ----------------------------------------------------------


async def test_422_raises_session_expires_to_the_phones_min_se(strict, tmp_path):
    async with SippPhone("timer_422", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        report = await phone.report()
        expires = {
            m.cseq: m.headers.get("session-expires", "")
            for m in parse_message_log(report.raw)
            if m.direction == "received" and m.method == "INVITE"
        }
        assert [v.split(";")[0] for v in expires.values()] == ["90", "120"], expires
        assert (await call.wait_for_tone(1000)).rms > 0.02
        await client.hangup("c1")
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


@pytest.mark.timeout(150)
async def test_unanswered_session_refresh_ends_the_call(strict, tmp_path):
    # Session-Expires 90 with us as refresher: a re-INVITE at 45 s, never
    # answered; pjsip gives up after Timer B (32 s) and sends BYE.
    async with SippPhone("timer_ignore", tmp_path) as phone, WebClient(strict.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        hangup = await client.wait_event(call, "hangup", timeout=110)
        assert hangup["outcome"] == "session_expired", hangup
        report = await phone.wait_for(lambda r: r.byes == 1, timeout=5)
        assert report.reinvites >= 1  # the refresh, never answered
