"""Call transfer: blind and attended REFERs from the browser, and a phone's REFER.

The phones are pjsua2 processes (:mod:`peers.pjsua_phone`), each playing its own
tone; a phone that gets a REFER places the new call itself and reports on it in
NOTIFYs. After each transfer the two phones must hear each other's tones, and
the browser's calls must have ended with the outcome ``transferred``.
"""

from __future__ import annotations

import asyncio

import pytest
from peers.pjsua_phone import PjsuaPhone
from peers.webclient import ClientCall, WebClient

pytestmark = pytest.mark.timeout(120)

A_HZ, B_HZ, BROWSER_HZ = 500, 700, 1000
MIN_RMS = 0.03


async def answered(client: WebClient, call_id: str, to: str, hz: float = BROWSER_HZ) -> ClientCall:
    call = await client.establish(call_id, to, tone_hz=hz)
    event = await client.wait_event(call, ("accepted", "hangup"), timeout=15)
    assert event["type"] == "accepted", event
    return call


async def hears(phone: PjsuaPhone, hz: float, who: str) -> None:
    heard = await phone.wait_for_tone(hz, 8.0, min_rms=MIN_RMS)
    assert abs(heard.hz - hz) <= 10 and heard.rms > MIN_RMS, f"{who} expected {hz} Hz: {heard}"


async def test_blind_transfer_joins_the_phone_to_the_target(gateway, tmp_path):
    """REFER to the dialplan's URI; NOTIFY progress reaches the browser; A and B talk."""
    async with (
        PjsuaPhone(tmp_path / "a", tone_hz=A_HZ) as a,
        PjsuaPhone(tmp_path / "b", tone_hz=B_HZ) as b,
        WebClient(gateway.url) as client,
    ):
        call = await answered(client, "c1", f"sipp{a.port}")
        await a.wait_confirmed()
        await hears(a, BROWSER_HZ, "phone A before the transfer")

        await client.send({"type": "transfer", "id": "t1", "call": "c1", "to": f"sipp{b.port}"})
        refer = await a.wait_event("refer", 10)
        assert f":{b.port}" in refer["uri"], refer
        final = await client.wait_message(
            lambda m: m["type"] == "transfer" and m.get("final"), timeout=15
        )
        assert (final["call"], final["code"], final["id"]) == ("c1", 200, "t1"), final
        hangup = await client.wait_event(call, "hangup", timeout=10)
        assert (hangup["outcome"], hangup["by"]) == ("transferred", "local"), hangup
        await b.wait_confirmed()
        # The gateway's BYE has ended A's first call: what A hears now is B.
        await a.wait_event("disconnected", 10)
        await hears(a, B_HZ, "phone A after the transfer")
        await hears(b, A_HZ, "phone B after the transfer")
        progress = [m for m in client.messages if m["type"] == "transfer"]
        assert progress[-1] is final and all(m["call"] == "c1" for m in progress), progress


async def test_attended_transfer_replaces_the_second_call(gateway, tmp_path):
    """REFER with Replaces: A calls B in place of the browser's second call; both end."""
    async with (
        PjsuaPhone(tmp_path / "a", tone_hz=A_HZ) as a,
        PjsuaPhone(tmp_path / "b", tone_hz=B_HZ) as b,
        WebClient(gateway.url) as client,
    ):
        c1 = await answered(client, "c1", f"sipp{a.port}")
        c2 = await answered(client, "c2", f"sipp{b.port}", hz=1200)
        reply = await client.request({"type": "hold", "call": "c1"})
        assert reply["type"] == "held", reply

        await client.send({"type": "transfer", "id": "t2", "call": "c1", "replaces": "c2"})
        refer = await a.wait_event("refer", 10)
        assert "Replaces" in refer["uri"] and f":{b.port}" in refer["uri"], refer
        await b.wait_event("replaced", 10)
        ended = {}
        for call in (c1, c2):
            hangup = await client.wait_event(call, "hangup", timeout=15)
            ended[call.call_id] = hangup["outcome"]
        assert ended == {"c1": "transferred", "c2": "transferred"}, client.messages
        await hears(a, B_HZ, "phone A after the attended transfer")
        await hears(b, A_HZ, "phone B after the attended transfer")


async def test_a_phones_refer_is_offered_to_the_browser_and_routed_by_the_dialplan(
    gateway, tmp_path
):
    """The worker declines the REFER (603); transfer_accept places the call itself."""
    async with (
        PjsuaPhone(tmp_path / "a", tone_hz=A_HZ) as a,
        PjsuaPhone(tmp_path / "b", tone_hz=B_HZ) as b,
        WebClient(gateway.url) as client,
    ):
        c1 = await answered(client, "c1", f"sipp{a.port}")
        await a.wait_confirmed()
        # The URI's host is not where the call goes: only its number is used.
        await a.xfer(f"sip:sipp{b.port}@192.0.2.1:5999")
        request = await client.wait_event(c1, "transfer_request", timeout=10)
        assert request["to"] == f"sipp{b.port}", request
        status = await a.wait_event(lambda e: e.get("event") == "xfer_status" and e["final"], 10)
        assert status["code"] == 603, status

        accept = {"type": "transfer_accept", "id": "ta", "call": "c1", "new_call": "c3"}
        c3 = await client.establish("c3", "", tone_hz=BROWSER_HZ, request=accept)
        event = await client.wait_event(c3, ("accepted", "hangup"), timeout=15)
        assert event["type"] == "accepted", event
        hangup = await client.wait_event(c1, "hangup", timeout=10)
        assert hangup["outcome"] == "transferred", hangup
        await b.wait_confirmed()
        heard = await c3.wait_for_tone(B_HZ, 8.0, min_rms=MIN_RMS)
        assert abs(heard.hz - B_HZ) <= 10, heard
        await hears(b, BROWSER_HZ, "phone B on the browser's new call")
        await client.hangup("c3")


async def test_bad_transfers_get_errors_and_send_nothing(gateway, tmp_path):
    async with (
        PjsuaPhone(tmp_path / "a", tone_hz=A_HZ) as a,
        WebClient(gateway.url) as client,
    ):
        await answered(client, "c1", f"sipp{a.port}")
        cases = [
            ({"call": "nope", "to": "echo"}, "not_found"),
            ({"call": "c1", "to": "echo", "replaces": "c2"}, "bad_request"),
            ({"call": "c1"}, "bad_request"),
            ({"call": "c1", "replaces": "c1"}, "bad_request"),
            ({"call": "c1", "replaces": "c9"}, "not_found"),
            ({"call": "c1", "to": "blocked-900"}, "forbidden"),
            ({"call": "c1", "to": "nowhere"}, "forbidden"),
            ({"call": "c1", "to": "1003\r\nX-Evil: 1"}, "bad_request"),
            ({"call": "c1", "to": 'sipp5060"<sip:x@evil>'}, "bad_request"),
            ({"call": "c1", "to": ""}, "bad_request"),
        ]
        for fields, code in cases:
            reply = await client.request({"type": "transfer", **fields})
            assert (reply["type"], reply["code"]) == ("error", code), (fields, reply)
        for kind in ("transfer_accept", "transfer_reject"):
            message = {"type": kind, "call": "c1", "new_call": "c5", "sdp": "v=0"}
            reply = await client.request(message)
            assert (reply["type"], reply["code"]) == ("error", "wrong_state"), (kind, reply)
        await asyncio.sleep(0.5)
        assert not [e for e in a.events if e.get("event") == "refer"], a.events
        assert not [m for m in client.messages if m["type"] == "hangup"], client.messages
        await client.hangup("c1")


async def test_two_calls_one_held_while_the_other_talks(gateway, tmp_path):
    """A desk phone's two lines: the held call is silent both ways, the other one
    carries audio; swapping the hold swaps which phone hears the browser."""
    async with (
        PjsuaPhone(tmp_path / "a", tone_hz=A_HZ) as a,
        PjsuaPhone(tmp_path / "b", tone_hz=B_HZ) as b,
        WebClient(gateway.url) as client,
    ):
        c1 = await answered(client, "c1", f"sipp{a.port}", hz=1000)
        reply = await client.request({"type": "hold", "call": "c1"})
        assert (reply["type"], reply["by"]) == ("held", "local"), reply
        c2 = await answered(client, "c2", f"sipp{b.port}", hz=1200)
        await hears(b, 1200, "phone B on the active line")
        heard = await c2.wait_for_tone(B_HZ, 8.0, min_rms=MIN_RMS)
        assert abs(heard.hz - B_HZ) <= 10, heard
        silence = await a.wait_for_silence()
        assert silence.rms < 0.005, f"phone A hears the browser while held: {silence}"

        reply = await client.request({"type": "hold", "call": "c2"})
        assert reply["type"] == "held", reply
        reply = await client.request({"type": "unhold", "call": "c1"})
        assert (reply["type"], reply["by"]) == ("resumed", "local"), reply
        await hears(a, 1000, "phone A after the swap")
        heard = await c1.wait_for_tone(A_HZ, 8.0, min_rms=MIN_RMS)
        assert abs(heard.hz - A_HZ) <= 10, heard
        silence = await b.wait_for_silence()
        assert silence.rms < 0.005, f"phone B hears the browser while held: {silence}"
        for call_id in ("c1", "c2"):
            await client.hangup(call_id)
