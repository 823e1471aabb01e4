"""The call path against a real SIP phone: sipp as the UAS, an aiortc client as the browser.

Each test checks what actually arrived: the tone's frequency at the far end,
the SIP messages sipp received, and the events the browser got.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from conftest import free_port
from peers.sipp import SippPhone
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(90)


def number(phone: SippPhone) -> str:
    """The test dialplan routes ``sipp<port>`` to ``sip:phone@127.0.0.1:<port>``."""
    return f"sipp{phone.port}"


async def test_echo_phone_returns_the_callers_tone(gateway, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", number(phone), tone_hz=1000)
        ringing = await client.wait_event(call, "ringing")
        assert (ringing["code"], ringing["reason"]) == (180, "Ringing")
        accepted = await client.wait_event(call, "accepted")
        assert accepted["codecs"]["sip"] in ("PCMU/8000", "PCMA/8000")
        await asyncio.sleep(2.5)
        tone = call.measure(1.0)
        assert abs(tone.hz - 1000) <= 10, tone
        assert tone.rms > 0.02, tone
        await client.hangup("c1")
        report = await phone.wait_for(lambda r: r.byes == 1, timeout=5)
        assert report.invites == 1


async def test_phone_playing_a_tone_is_heard_by_the_browser(gateway, tmp_path):
    async with SippPhone("tone", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", number(phone), tone_hz=0)
        await client.wait_event(call, "accepted")
        await asyncio.sleep(2.5)
        tone = call.measure(1.0)
        assert abs(tone.hz - 1000) <= 10, tone
        assert tone.rms > 0.05, tone
        await client.hangup("c1")
        # Gone before the BYE, the phone would leave the gateway retrying it for 32 s.
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_busy_phone_gives_hangup_486(gateway, tmp_path):
    async with SippPhone("busy", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", number(phone))
        hangup = await client.wait_event(call, "hangup")
        assert (hangup["code"], hangup["reason"], hangup["by"]) == (486, "Busy Here", "remote")
        await phone.wait_for(lambda r: r.acks == 1, timeout=5)


async def test_closed_target_port_ends_the_call_within_two_seconds(gateway):
    # Nothing listens on this port: the host answers with ICMP port unreachable,
    # which the gateway's probe hears long before the invite timeout (3 s here).
    async with WebClient(gateway.url) as client:
        call = await client.establish("c1", f"sipp{free_port(2)}")
        await client.wait_event(call, "answer")
        start = time.monotonic()
        hangup = await client.wait_event(call, "hangup", timeout=10)
        elapsed = time.monotonic() - start
        assert hangup["outcome"] == "target_unreachable", hangup
        assert (hangup["code"], hangup["by"]) == (503, "gateway")
        assert elapsed < 2.5, elapsed  # ICE set-up (tens of ms) + the probe's 2 s bound


async def test_blackholed_target_gives_408_at_the_invite_timeout(gateway):
    # A socket that swallows every datagram: no response and no ICMP either.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        async with WebClient(gateway.url) as client:
            call = await client.establish("c1", f"sipp{hole.getsockname()[1]}")
            await client.wait_event(call, "answer")
            start = time.monotonic()
            hangup = await client.wait_event(call, "hangup", timeout=10)
            elapsed = time.monotonic() - start
            assert hangup["outcome"] == "invite_timeout", hangup
            assert (hangup["code"], hangup["by"]) == (408, "gateway")
            assert 2.5 < elapsed < 5, elapsed  # sip.invite_timeout = 3 s
            hole.setblocking(False)
            invites = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    invites.append(hole.recv(65536))
            # The INVITE (and its retransmissions) and the probe's keep-alives.
            assert any(d.startswith(b"INVITE sip:phone@127.0.0.1") for d in invites), invites
            assert set(invites) - {b"\r\n\r\n"}


async def test_phone_hangs_up_with_bye(gateway, tmp_path):
    async with (
        SippPhone("bye", tmp_path, bye_after_ms=1500) as phone,
        WebClient(gateway.url) as client,
    ):
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        hangup = await client.wait_event(call, "hangup", timeout=10)
        assert hangup["by"] == "remote"
        assert hangup["code"] == 200
        assert "BYE" in hangup["reason"]
        # The call is gone: hanging it up again is an error, not a crash.
        reply = await client.hangup("c1")
        assert (reply["type"], reply["code"]) == ("error", "not_found")


async def test_browser_hangup_sends_bye(gateway, tmp_path):
    async with SippPhone("answer_wait_bye", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        assert (await phone.report()).byes == 0
        reply = await client.hangup("c1")
        assert (reply["type"], reply["code"], reply["by"]) == ("hangup", 200, "local")
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_browser_hangup_while_ringing_sends_cancel(gateway, tmp_path):
    async with SippPhone("ring", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "ringing")
        reply = await client.hangup("c1")
        assert (reply["type"], reply["code"], reply["by"]) == ("hangup", 487, "local")
        report = await phone.wait_for(lambda r: r.cancels == 1, timeout=5)
        assert report.byes == 0


async def test_closed_websocket_sends_bye_within_2s(gateway, tmp_path):
    async with SippPhone("answer_wait_bye", tmp_path) as phone:
        client = WebClient(gateway.url)
        await client.connect()
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "accepted")
        await client.close()
        closed = time.monotonic()
        await phone.wait_for(lambda r: r.byes == 1, timeout=2.0)
        assert time.monotonic() - closed <= 2.0


async def test_closed_websocket_while_ringing_sends_cancel(gateway, tmp_path):
    async with SippPhone("ring", tmp_path) as phone:
        client = WebClient(gateway.url)
        await client.connect()
        call = await client.establish("c1", number(phone))
        await client.wait_event(call, "ringing")
        await client.close()
        await phone.wait_for(lambda r: r.cancels == 1, timeout=2.0)


async def test_unmatched_number_is_forbidden_and_sends_no_invite(gateway, tmp_path):
    async with SippPhone("echo", tmp_path) as phone, WebClient(gateway.url) as client:
        # Looks like the phone's port, but matches no rule; and one a reject rule catches.
        for to in (f"phone{phone.port}", f"blocked{phone.port}"):
            reply = await client.request({"type": "call", "call": to, "to": to, "sdp": "v=0\r\n"})
            assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
        await asyncio.sleep(1.0)
        assert (await phone.report()).invites == 0


async def test_five_calls_spread_over_two_workers_all_carry_audio(gateway, tmp_path):
    """Each worker takes 4 calls (pjsua2's limit); the fifth must land on the other one."""
    tones = [600, 800, 1000, 1200, 1400]
    log_start = len(gateway.log.read_text())
    async with SippPhone("echo", tmp_path, calls=5) as phone, WebClient(gateway.url) as client:
        calls = await asyncio.gather(
            *(client.establish(f"c{hz}", number(phone), tone_hz=hz) for hz in tones)
        )
        for call in calls:
            event = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
            assert event["type"] == "accepted", event
        assert gateway.health()["calls_active"] == 5
        await asyncio.sleep(3)
        for hz, call in zip(tones, calls, strict=True):
            tone = call.measure(1.0)
            assert abs(tone.hz - hz) <= 10, (hz, tone)
            assert tone.rms > 0.02, (hz, tone)
        for hz in tones:
            await client.hangup(f"c{hz}")
        report = await phone.wait_for(lambda r: r.byes == 5, timeout=10)
        assert report.invites == 5
    # Only this test's calls: each worker took some of the five.
    placed = [
        line
        for line in gateway.log.read_text()[log_start:].splitlines()
        if " to sip:phone@" in line
    ]
    assert len(placed) == 5, placed
    assert {line.rsplit("on worker ", 1)[1] for line in placed} == {"0", "1"}, placed
