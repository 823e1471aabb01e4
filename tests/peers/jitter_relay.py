"""A UDP relay that delays every RTP datagram between a SIP UA and a phone (jitter).

The kernel here has no netem qdisc, so the impairment tests delay packets in user
space: the phone's SDP advertises the relay's *public* port instead of its own
media port, and the relay forwards both ways::

    gateway RTP --> public port --(delay)--> phone side --> phone's media port
    gateway RTP <-- public port <--(delay)-- phone side <-- phone (echo replies)
                                             intercept  <-- phone (its own stream,
                                                            redirected by nft DNAT)

Each datagram gets its own delay, drawn uniformly from ``delay`` (20-40 ms by
default: 30 +/- 10 ms) and is sent when it expires. Delays are independent, as
netem's are without a rate, so a datagram may overtake the one before it; at 20 ms
packet spacing that is rare, and the relay counts it (``reordered``).

The relay also keeps the RTP it passes to the phone, so a test can measure what
the phone actually heard (G.711 decoded, :meth:`phone_heard`). One relay serves
one call: it sends the phone's audio to the last address the gateway's RTP came
from. Loss is not the relay's job (an nft rule drops packets on the public port).
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from dataclasses import dataclass, field

import numpy as np

HOST = "127.0.0.1"


@dataclass
class DirectionStats:
    received: int = 0
    forwarded: int = 0
    reordered: int = 0
    delay_min_ms: float = 1e9
    delay_max_ms: float = 0.0
    delay_total_ms: float = 0.0
    _last_seq: int | None = None

    def as_dict(self) -> dict[str, float | int]:
        mean = self.delay_total_ms / self.received if self.received else 0.0
        return {
            "received": self.received,
            "forwarded": self.forwarded,
            "reordered": self.reordered,
            "delay_min_ms": round(self.delay_min_ms if self.received else 0.0, 1),
            "delay_mean_ms": round(mean, 1),
            "delay_max_ms": round(self.delay_max_ms, 1),
        }


def rtp_header(data: bytes) -> tuple[int, int, int] | None:
    """(payload type, sequence number, header length) of an RTP datagram, or None."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    pt = data[1] & 0x7F
    if 72 <= pt <= 76:  # RTCP multiplexed on the port
        return None
    seq = struct.unpack_from("!H", data, 2)[0]
    length = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= length + 4:  # header extension
        length += 4 + 4 * struct.unpack_from("!H", data, length + 2)[0]
    return pt, seq, length


def _seq_newer(a: int, b: int) -> bool:
    """RTP sequence ``a`` comes after ``b`` (modulo 2**16)."""
    return 0 < (a - b) & 0xFFFF < 0x8000


# G.711 decoders written from ITU-T G.711's tables as closed-form expressions.
def ulaw_decode(data: bytes) -> np.ndarray:
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + 0x84 << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def alaw_decode(data: bytes) -> np.ndarray:
    a = np.frombuffer(data, dtype=np.uint8).astype(np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


DECODERS = {0: ulaw_decode, 8: alaw_decode}


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: object) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)  # type: ignore[operator]

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.
        pass


@dataclass
class JitterRelay:
    """See the module docstring. Start it, give the phone ``port``, then ``connect``."""

    delay: tuple[float, float] = (0.020, 0.040)
    seed: int | None = None
    #: gateway -> phone, phone -> gateway
    to_phone: DirectionStats = field(default_factory=DirectionStats)
    to_gateway: DirectionStats = field(default_factory=DirectionStats)
    #: phone-bound RTP: (arrival monotonic time, seq, payload type, payload)
    heard: list[tuple[float, int, int, bytes]] = field(default_factory=list)
    #: phone datagrams dropped because no gateway RTP had arrived yet to learn its address
    unroutable: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._public: asyncio.DatagramTransport | None = None
        self._phone_side: asyncio.DatagramTransport | None = None
        self._intercept: asyncio.DatagramTransport | None = None
        self._gateway: tuple[str, int] | None = None
        self._phone: tuple[str, int] | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> JitterRelay:
        loop = asyncio.get_running_loop()
        self._public, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self._from_gateway), local_addr=(HOST, 0)
        )
        self._phone_side, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self._from_phone), local_addr=(HOST, 0)
        )
        self._intercept, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self._from_phone), local_addr=(HOST, 0)
        )
        return self

    @property
    def port(self) -> int:
        """The port the phone's SDP advertises: the gateway's RTP comes here."""
        assert self._public is not None
        return int(self._public.get_extra_info("sockname")[1])

    @property
    def intercept_port(self) -> int:
        """Where an nft DNAT rule sends the phone's own stream (it is sent to the gateway)."""
        assert self._intercept is not None
        return int(self._intercept.get_extra_info("sockname")[1])

    def connect(self, phone_media_port: int) -> None:
        """Forward the gateway's RTP to the phone's real media port."""
        self._phone = (HOST, phone_media_port)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for transport in (self._public, self._phone_side, self._intercept):
            if transport is not None:
                transport.close()

    # -- forwarding ------------------------------------------------------------

    def _from_gateway(self, data: bytes, addr: tuple[str, int]) -> None:
        self._gateway = addr
        header = rtp_header(data)
        if header is not None:
            pt, seq, length = header
            self.heard.append((time.monotonic(), seq, pt, data[length:]))
        if self._phone is None:
            self.to_phone.received += 1
            return
        self._later(data, self._phone, self._phone_side, self.to_phone, header)

    def _from_phone(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._gateway is None:
            self.unroutable += 1
            return
        # Sent from the public port: the gateway sees the address the SDP gave.
        self._later(data, self._gateway, self._public, self.to_gateway, rtp_header(data))

    def _later(
        self,
        data: bytes,
        addr: tuple[str, int],
        transport: asyncio.DatagramTransport | None,
        stats: DirectionStats,
        header: tuple[int, int, int] | None,
    ) -> None:
        delay = self._random.uniform(*self.delay)
        stats.received += 1
        stats.delay_min_ms = min(stats.delay_min_ms, delay * 1000)
        stats.delay_max_ms = max(stats.delay_max_ms, delay * 1000)
        stats.delay_total_ms += delay * 1000
        seq = header[1] if header is not None else None

        def send() -> None:
            self._timers.discard(timer)
            if transport is None or transport.is_closing():
                return
            transport.sendto(data, addr)
            stats.forwarded += 1
            if seq is not None:
                if stats._last_seq is not None and not _seq_newer(seq, stats._last_seq):
                    stats.reordered += 1
                else:
                    stats._last_seq = seq

        timer = asyncio.get_running_loop().call_later(delay, send)
        self._timers.add(timer)

    # -- what the phone heard ----------------------------------------------------

    def phone_heard(self, seconds: float = 1.0) -> np.ndarray:
        """The last ``seconds`` of phone-bound audio, 8 kHz s16, in sequence order.

        A sequence number that never arrived (dropped before the relay) is
        silence, as it would be at a phone without concealment.
        """
        since = time.monotonic() - seconds
        packets = [p for p in self.heard if p[0] >= since and p[2] in DECODERS]
        if not packets:
            return np.zeros(0, dtype=np.int16)
        # unwrap sequence numbers relative to the first packet of the window
        first = packets[0][1]
        ordered = sorted(((seq - first + 0x8000) & 0xFFFF, pt, pl) for _, seq, pt, pl in packets)
        out: list[np.ndarray] = []
        expected = ordered[0][0]
        frame = len(ordered[0][2])
        for index, pt, payload in ordered:
            if index < expected:  # duplicate
                continue
            if index > expected:
                out.append(np.zeros((index - expected) * frame, dtype=np.int16))
            out.append(DECODERS[pt](payload))
            expected = index + 1
        return np.concatenate(out)

    def stats(self) -> dict[str, object]:
        return {
            "port": self.port,
            "to_phone": self.to_phone.as_dict(),
            "to_gateway": self.to_gateway.as_dict(),
            "unroutable": self.unroutable,
        }
