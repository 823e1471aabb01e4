"""The audio track the gateway sends to the browser: SIP audio, paced at 20 ms."""

from __future__ import annotations

import asyncio
import time

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from gateway.worker.media.buffers import FrameBuffer
from gateway.worker.media.frames import PTIME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME, SILENCE, TIME_BASE


class SipAudioTrack(MediaStreamTrack):
    """Plays frames from ``source`` (filled by the SIP leg) as a WebRTC audio track.

    ``recv`` is called by aiortc's RTP sender, which encodes (and resamples,
    with PyAV) what it gets. It returns one 20 ms frame per 20 ms of wall clock,
    silence when the SIP leg has nothing yet (counted by the buffer).
    """

    kind = "audio"

    def __init__(self, source: FrameBuffer) -> None:
        super().__init__()
        self._source = source
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += SAMPLES_PER_FRAME
            wait = self._start + self._pts / SAMPLE_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -10 * PTIME_MS / 1000:
                # Fell far behind (a stalled loop): restart the clock, do not burst.
                self._start = time.monotonic() - self._pts / SAMPLE_RATE
        data = self._source.pop() or SILENCE
        frame = av.AudioFrame(format="s16", layout="mono", samples=SAMPLES_PER_FRAME)
        frame.planes[0].update(data)
        frame.pts = self._pts
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = TIME_BASE
        return frame
