"""What every desk phone does, on an outgoing call: DTMF both ways, hold and resume.

The phones are real: sipp (``dtmf`` mode: telephone-event on payload type 96,
RTP echoed, and INFOs of its own) and a pjsua2 process (:mod:`peers.pjsua_phone`)
that reports the SDP directions it sees and the tone it hears.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from peers.pjsua_phone import PjsuaPhone
from peers.sipp import SippPhone
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)

PHONE_HZ = 700
BROWSER_HZ = 1000


def info_signals(raw: str) -> list[str]:
    """The ``Signal=`` digits of the distinct INFO requests sipp received, in order."""
    signals: dict[str, str] = {}
    for block in re.split(r"\n(?=UDP message )", raw):
        if "message received" not in block.split("\n", 1)[0]:
            continue
        text = block.split("\n", 1)[-1].lstrip()
        cseq = re.search(r"(?im)^CSeq:\s*(\d+)\s+INFO", text)
        signal = re.search(r"(?m)^Signal=\s*(\S)", text)
        if text.startswith("INFO ") and cseq and signal:
            signals.setdefault(cseq.group(1), signal.group(1))
    return list(signals.values())


async def test_rfc4733_digits_go_out_and_come_back(gateway, tmp_path):
    # sipp answers telephone-event on the gateway's own payload type (120) and
    # echoes every RTP packet: the digits come back to the gateway and the browser.
    async with SippPhone("dtmf", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", f"sipp{phone.port}")
        await client.wait_event(call, "accepted")
        await client.send({"type": "dtmf", "call": "c1", "digits": "159#"})

        def echoed() -> list[dict[str, object]]:
            return [
                m
                for m in client.messages
                if m["type"] == "dtmf" and m.get("call") == "c1" and m["method"] == "rfc4733"
            ]

        for _ in range(40):
            if len(echoed()) >= 4:
                break
            await asyncio.sleep(0.25)
        assert "".join(str(m["digit"]) for m in echoed()) == "159#", client.messages
        assert all(100 <= int(str(m["duration"])) <= 300 for m in echoed()), echoed()
        assert not [m for m in client.messages if m["type"] == "error"], client.messages
        await client.hangup("c1")
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)  # or 32 s of BYE retries


class _RtpSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.packets.append(data)


async def test_rfc4733_uses_the_payload_type_the_phone_answered(gateway, tmp_path):
    # The phone answers telephone-event on 96 (not the 120 offered, not 101):
    # RFC 3264 says that is what it wants to receive. Its RTP address is a
    # socket of the test, which reads what arrives.
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(_RtpSink, local_addr=("127.0.0.1", 0))
    rtp_port = transport.get_extra_info("sockname")[1]
    try:
        async with (
            SippPhone("dtmf", tmp_path, dtmf_pt=96, rtp_port=rtp_port) as phone,
            WebClient(gateway.url) as client,
        ):
            call = await client.establish("c1", f"sipp{phone.port}")
            await client.wait_event(call, "accepted")
            await client.send({"type": "dtmf", "call": "c1", "digits": "3A"})
            await asyncio.sleep(1.5)
            events = [p for p in sink.packets if len(p) >= 16 and p[1] & 0x7F == 96]
            others = {p[1] & 0x7F for p in sink.packets} - {96}
            assert others <= {0}, others  # PCMU audio, nothing on another PT
            codes = []
            for packet in events:
                code = packet[12]  # RFC 4733: the event code opens the payload
                if not codes or codes[-1] != code:
                    codes.append(code)
            assert codes == [3, 12], codes  # "3", then "A" (event 12)
            await client.hangup("c1")
            await phone.wait_for(lambda r: r.byes == 1, timeout=5)
    finally:
        transport.close()


async def test_sip_info_digits_both_ways_and_415_for_other_bodies(gateway, tmp_path):
    async with SippPhone("dtmf", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", f"sipp{phone.port}")
        await client.wait_event(call, "accepted")
        # sipp's own INFO (Signal=7) reaches the browser.
        event = await client.wait_event(call, "dtmf", timeout=10)
        assert (event["digit"], event["method"]) == ("7", "info"), event
        await client.send({"type": "dtmf", "call": "c1", "digits": "42", "method": "info"})
        report = await phone.wait_for(lambda r: len(info_signals(r.raw)) >= 2, timeout=10)
        assert info_signals(report.raw) == ["4", "2"], report.raw[-3000:]
        # The INFO with a text/plain body was refused as unsupported, not a 500.
        assert "415 INFO" in report.received, report.received
        await client.hangup("c1")
        await phone.wait_for(lambda r: r.byes == 1, timeout=5)


async def test_bad_digits_and_digits_before_the_answer_are_refused(gateway, tmp_path):
    async with SippPhone("ring", tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", f"sipp{phone.port}")
        await client.wait_event(call, "ringing")
        early = await client.request({"type": "dtmf", "call": "c1", "digits": "1"})
        assert (early["type"], early["code"]) == ("error", "wrong_state"), early
        for digits in ("12\r\nX", "1;2", "E", "", "1" * 33, "\uff11"):
            reply = await client.request({"type": "dtmf", "call": "c1", "digits": digits})
            assert (reply["type"], reply["code"]) == ("error", "bad_request"), (digits, reply)
        reply = await client.request({"type": "dtmf", "call": "c1", "digits": "1", "method": "x"})
        assert reply["code"] == "bad_request", reply
        await client.hangup("c1")
        report = await phone.wait_for(lambda r: r.cancels == 1, timeout=5)
        assert "INFO" not in report.received


async def test_browser_holds_and_resumes(gateway, tmp_path):
    async with PjsuaPhone(tmp_path, tone_hz=PHONE_HZ) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", f"sipp{phone.port}", tone_hz=BROWSER_HZ)
        await client.wait_event(call, "accepted")
        await phone.wait_confirmed()
        assert (await call.wait_for_tone(PHONE_HZ)).rms > 0.03

        start = len(phone.events)
        held = await client.request({"type": "hold", "call": "c1"}, timeout=10)
        assert (held["type"], held["by"]) == ("held", "local"), held
        media = await phone.wait_event(
            lambda e: e.get("event") == "media" and e["remote_sdp"]["dir"] == "sendonly", 10, start
        )
        assert media["local_sdp"]["dir"] == "recvonly", media
        # The phone still hears the browser (we send); the browser hears nothing.
        heard = await phone.wait_for_tone(BROWSER_HZ)
        assert abs(heard.hz - BROWSER_HZ) <= 10 and heard.rms > 0.03, heard
        await asyncio.sleep(1.5)
        assert call.measure(1.0).rms < 0.005

        resumed = await client.request({"type": "unhold", "call": "c1"}, timeout=10)
        assert (resumed["type"], resumed["by"]) == ("resumed", "local"), resumed
        await asyncio.sleep(1.5)
        tone = await call.wait_for_tone(PHONE_HZ)
        assert abs(tone.hz - PHONE_HZ) <= 10 and tone.rms > 0.03, tone
        heard = await phone.wait_for_tone(BROWSER_HZ)
        assert abs(heard.hz - BROWSER_HZ) <= 10 and heard.rms > 0.03, heard
        await client.hangup("c1")


async def test_phone_hold_and_resume_are_reported_to_the_browser(gateway, tmp_path):
    async with PjsuaPhone(tmp_path, tone_hz=PHONE_HZ) as phone, WebClient(gateway.url) as client:
        call = await client.establish("c1", f"sipp{phone.port}", tone_hz=BROWSER_HZ)
        await client.wait_event(call, "accepted")
        await phone.wait_confirmed()
        await phone.hold()
        held = await client.wait_event(call, "held")
        assert held["by"] == "remote" and "id" not in held, held
        await phone.resume()
        resumed = await client.wait_event(call, "resumed")
        assert resumed["by"] == "remote", resumed
        await asyncio.sleep(1.5)
        tone = await call.wait_for_tone(PHONE_HZ)
        assert abs(tone.hz - PHONE_HZ) <= 10 and tone.rms > 0.03, tone
        await client.hangup("c1")
