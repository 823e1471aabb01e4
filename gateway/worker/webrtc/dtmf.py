"""RFC 4733 telephone-events inside the browser's RTP (what ``RTCDTMFSender`` sends).

aiortc knows no ``telephone-event`` codec: it leaves it out of its answers, so a
browser never sends such events, and a packet of an unknown payload type would
be dropped (or, once negotiated, handed to a decoder that does not exist). This
module adds the codec to aiortc's audio capabilities (8 kHz and 48 kHz, the
rates browsers offer) and takes the events off a receiver before aiortc sees
them, reporting each digit once, when it ends.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpCodecParameters, RTCRtpReceiver
from aiortc.codecs import CODECS

logger = logging.getLogger(__name__)

MIME_TYPE = "audio/telephone-event"
#: The events of RFC 4733 section 3.2 that are DTMF digits, by event code.
DIGITS = "0123456789*#ABCD"
#: The end bit of the second byte of an event's payload (RFC 4733 section 2.3).
_END = 0x80
_RTPMAP = re.compile(r"^a=rtpmap:(\d+) telephone-event/(\d+)", re.I | re.M)


def register_codec() -> None:
    """Offer and accept telephone-event at 48 kHz and 8 kHz (once per process).

    Listed after the audio codecs, so that aiortc never picks it to encode
    audio (it sends with the first codec in common, in the offer's order).
    """
    audio = CODECS["audio"]
    if any(c.mimeType.lower() == MIME_TYPE for c in audio):
        return
    for payload_type, rate in ((110, 48000), (126, 8000)):
        audio.append(
            RTCRtpCodecParameters(
                mimeType=MIME_TYPE,
                clockRate=rate,
                channels=1,
                payloadType=payload_type,
                parameters={"0-15": None},
            )
        )


def event_payload_types(sdp: str) -> dict[int, int]:
    """The telephone-event payload types an SDP negotiated, with their clock rates."""
    return {int(pt): int(rate) for pt, rate in _RTPMAP.findall(sdp)}


def parse_event(payload: bytes) -> tuple[str, bool, int] | None:
    """An event packet's (digit, end bit, duration in timestamp units), or None."""
    if len(payload) < 4:
        return None
    event, flags, duration = struct.unpack("!BBH", payload[:4])
    if event >= len(DIGITS):
        return None  # not a DTMF digit (e.g. a fax tone)
    return DIGITS[event], bool(flags & _END), duration


class DigitReceiver:
    """Takes telephone-event packets off ``receiver`` and reports each digit once.

    An event is sent as several packets with one RTP timestamp, its last three
    with the end bit set: the first end packet of a timestamp is the digit.
    Other packets go on to aiortc unchanged.
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        payload_types: dict[int, int],
        on_digit: Callable[[str, int], None],
    ) -> None:
        self._rates = payload_types
        self._on_digit = on_digit
        self._last: tuple[int, int] | None = None  # (ssrc, timestamp) of the last digit
        self._handle = receiver._handle_rtp_packet
        # The DTLS transport looks the method up on the instance for every packet.
        receiver._handle_rtp_packet = self._handle_rtp_packet  # type: ignore[method-assign]

    async def _handle_rtp_packet(self, packet: Any, arrival_time_ms: int) -> None:
        rate = self._rates.get(packet.payload_type)
        if rate is None:
            await self._handle(packet, arrival_time_ms)
            return
        event = parse_event(packet.payload)
        if event is None:
            return
        digit, end, duration = event
        key = (packet.ssrc, packet.timestamp)
        if end and key != self._last:
            self._last = key
            self._on_digit(digit, duration * 1000 // rate)
