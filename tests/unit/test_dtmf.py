"""The browser's in-band DTMF: RFC 4733 payloads, and each digit reported once."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

from gateway.worker.webrtc.dtmf import DigitReceiver, event_payload_types, parse_event


def payload(event: int, end: bool, duration: int) -> bytes:
    return struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)


def test_parse_event_digits_and_end_bit():
    assert parse_event(payload(0, False, 160)) == ("0", False, 160)
    assert parse_event(payload(11, True, 800)) == ("#", True, 800)
    assert parse_event(payload(15, True, 1)) == ("D", True, 1)
    assert parse_event(payload(16, True, 1)) is None  # flash, not a digit
    assert parse_event(b"\x01\x80") is None


def test_event_payload_types_from_an_answer():
    sdp = "a=rtpmap:111 opus/48000/2\r\na=rtpmap:110 telephone-event/48000\r\n"
    sdp += "a=rtpmap:126 telephone-event/8000\r\n"
    assert event_payload_types(sdp) == {110: 48000, 126: 8000}


def test_each_digit_once_and_audio_passes_through():
    passed: list[int] = []
    digits: list[tuple[str, int]] = []

    async def aiortc_handler(packet, arrival_time_ms):
        passed.append(packet.payload_type)

    receiver = SimpleNamespace(_handle_rtp_packet=aiortc_handler)
    DigitReceiver(receiver, {110: 48000}, lambda d, ms: digits.append((d, ms)))

    def packet(pt: int, ts: int, data: bytes) -> SimpleNamespace:
        return SimpleNamespace(payload_type=pt, ssrc=1, timestamp=ts, payload=data)

    async def feed() -> None:
        stream = [packet(111, 0, b"opus")]
        stream += [packet(110, 960, payload(5, False, d)) for d in (960, 1920)]
        stream += [packet(110, 960, payload(5, True, 4800))] * 3  # end, sent three times
        stream += [packet(110, 9600, payload(10, True, 2400))] * 3
        stream += [packet(111, 20000, b"opus")]
        for p in stream:
            await receiver._handle_rtp_packet(p, 0)

    asyncio.run(feed())
    assert digits == [("5", 100), ("*", 50)]
    assert passed == [111, 111]
