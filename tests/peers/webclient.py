"""An aiortc client standing in for a browser: WebSocket signaling, a tone out, audio in.

Used by the end-to-end tests and by ``bench/``. It speaks protocol v1 over
``/ws``, sends a sine tone (or silence) as its microphone, records what the
gateway sends back and measures its dominant frequency with an FFT.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from gateway.worker.webrtc.peer import restrict_host_addresses

RATE = 48000
SAMPLES = 960  # 20 ms

# Keep this process's ICE on loopback, like the gateway's under test.
restrict_host_addresses(["127.0.0.1"])


class ToneTrack(MediaStreamTrack):  # type: ignore[misc]
    """A microphone that plays a sine (``hz=0``: silence), paced at 20 ms."""

    kind = "audio"

    def __init__(self, hz: float, amplitude: float = 0.3) -> None:
        super().__init__()
        self.hz = hz
        self.amplitude = amplitude
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += SAMPLES
            wait = self._start + self._pts / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        t = (np.arange(SAMPLES) + self._pts) / RATE
        pcm = (np.sin(2 * np.pi * self.hz * t) * self.amplitude * 32767).astype("<i2")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


@dataclass(frozen=True)
class ToneMeasure:
    hz: float
    rms: float  # of full scale 32767


def dominant_frequency(pcm: np.ndarray, rate: int) -> ToneMeasure:
    """Dominant frequency and RMS level of mono s16 ``pcm``."""
    if len(pcm) < rate // 10:
        return ToneMeasure(0.0, 0.0)
    x = pcm.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[:5] = 0  # ignore DC
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return ToneMeasure(float(freqs[spectrum.argmax()]), float(np.sqrt((x**2).mean()) / 32767))


@dataclass
class ClientCall:
    call_id: str
    pc: RTCPeerConnection
    tone: ToneTrack
    events: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    frames_received: int = 0
    first_audio: float | None = None
    recorder: asyncio.Task[None] | None = None

    def audio(self, seconds: float) -> np.ndarray:
        """The last ``seconds`` of received audio as 48 kHz mono s16."""
        if not self.chunks:
            return np.zeros(0, dtype=np.int16)
        pcm = np.concatenate(self.chunks)
        return pcm[-int(seconds * RATE) :]

    def measure(self, seconds: float = 1.0) -> ToneMeasure:
        return dominant_frequency(self.audio(seconds), RATE)

    async def wait_for_tone(
        self, hz: float, timeout: float = 8.0, tolerance: float = 10.0, min_rms: float = 0.02
    ) -> ToneMeasure:
        """Measure the last second until it is ``hz`` with real energy, or ``timeout`` passes.

        Returns the last measurement either way; the caller asserts on it.
        """
        deadline = time.monotonic() + timeout
        while True:
            tone = self.measure(1.0)
            if abs(tone.hz - hz) <= tolerance and tone.rms > min_rms:
                return tone
            if time.monotonic() > deadline:
                return tone
            await asyncio.sleep(0.25)


async def offer_sdp(hz: float = 440.0) -> str:
    """One real aiortc offer as text, for tests that send many ``call`` requests
    without media (the gateway answers each; ``calls.invite_after_ice = false``
    sends the INVITE without waiting for ICE)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(ToneTrack(hz))
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


class WebClient:
    """One WebSocket connection to the gateway, with any number of calls."""

    def __init__(
        self,
        base_url: str,
        autoping: bool = True,
        origin: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: Trust for a gateway serving HTTPS/WSS; extra upgrade headers (X-Forwarded-For).
        self.ssl_context = ssl_context
        self.headers = headers or {}
        #: False: never answer the gateway's WebSocket pings (a silently dead client).
        self.autoping = autoping
        #: The ``Origin`` header to send, as a browser would (default: none, like aiohttp).
        self.origin = origin
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.messages: list[dict[str, Any]] = []
        self.calls: dict[str, ClientCall] = {}
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> WebClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(
            f"{self.base_url}/ws",
            autoping=self.autoping,
            origin=self.origin,
            ssl=self.ssl_context if self.ssl_context is not None else True,
            headers=self.headers,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for frame in self.ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            self.messages.append(message)
            call = self.calls.get(message.get("call", ""))
            if call is not None:
                call.events.append(message)
            self._changed.set()
        self._changed.set()

    async def send(self, message: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def wait_message(
        self, predicate: Any, timeout: float = 10.0, start: int = 0
    ) -> dict[str, Any]:
        """The first message (from index ``start``) for which ``predicate`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages[start:]:
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message; got {self.messages}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def request(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send ``message`` with a fresh ``id`` and return the reply carrying that id."""
        request_id = f"r{len(self.messages)}-{time.monotonic_ns()}"
        start = len(self.messages)
        await self.send({**message, "id": request_id})
        return await self.wait_message(lambda m: m.get("id") == request_id, timeout, start)

    async def call(
        self,
        call_id: str,
        to: str,
        tone_hz: float = 1000.0,
        request: dict[str, Any] | None = None,
    ) -> ClientCall:
        """Offer a call; returns once the offer is sent (events arrive on the ClientCall).

        ``request``: send this message (with the offer as ``sdp``) instead of a
        ``call`` (e.g. a ``transfer_accept`` whose ``new_call`` is ``call_id``).
        """
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tone = ToneTrack(tone_hz)
        pc.addTrack(tone)
        call = ClientCall(call_id, pc, tone)
        self.calls[call_id] = call

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            call.recorder = asyncio.create_task(self._record(call, track))

        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await self.send(
            {**request, "sdp": sdp}
            if request is not None
            else {"type": "call", "call": call_id, "to": to, "sdp": sdp}
        )
        return call

    async def accept(self, incoming: dict[str, Any], tone_hz: float = 1000.0) -> ClientCall:
        """Answer an ``incoming`` message's offer and send ``accept``; returns the call."""
        call_id = incoming["call"]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tone = ToneTrack(tone_hz)
        call = ClientCall(call_id, pc, tone)
        call.events.append(incoming)
        self.calls[call_id] = call

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            call.recorder = asyncio.create_task(self._record(call, track))

        await pc.setRemoteDescription(RTCSessionDescription(incoming["sdp"], "offer"))
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio":
                transceiver.sender.replaceTrack(tone)
                transceiver.direction = "sendrecv"
        await pc.setLocalDescription(await pc.createAnswer())
        await self.send({"type": "accept", "call": call_id, "sdp": pc.localDescription.sdp})
        return call

    async def wait_event(
        self, call: ClientCall, kinds: str | tuple[str, ...], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait for an event of ``call`` (answers are applied to its peer connection)."""
        if isinstance(kinds, str):
            kinds = (kinds,)
        message = await self.wait_message(
            lambda m: m.get("call") == call.call_id and m["type"] in kinds, timeout
        )
        return message

    async def establish(
        self,
        call_id: str,
        to: str,
        tone_hz: float = 1000.0,
        timeout: float = 10.0,
        request: dict[str, Any] | None = None,
    ) -> ClientCall:
        """Call and apply the answer; returns after the ``answer`` message."""
        call = await self.call(call_id, to, tone_hz, request)
        answer = await self.wait_event(call, ("answer", "error", "hangup"), timeout)
        if answer["type"] != "answer":
            raise AssertionError(f"call {call_id} refused: {answer}")
        await call.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return call

    async def _record(self, call: ClientCall, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            call.frames_received += 1
            if call.first_audio is None:
                call.first_audio = time.monotonic()
            for out in resampler.resample(frame):
                call.chunks.append(out.to_ndarray().reshape(-1).copy())

    async def hangup(self, call_id: str) -> dict[str, Any]:
        return await self.request({"type": "hangup", "call": call_id})

    async def close_calls(self) -> None:
        for call in self.calls.values():
            call.tone.stop()
            if call.recorder is not None:
                call.recorder.cancel()
            await call.pc.close()

    async def close(self) -> None:
        await self.close_calls()
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await self._reader
        if self.session is not None:
            await self.session.close()
