"""Bring decoded browser audio to the pivot format with PyAV.

aiortc hands over frames as its decoder made them (Opus: 48 kHz stereo,
PCMU/PCMA: 8 kHz mono, 20 ms each). :class:`PivotResampler` converts them to
16 kHz mono s16 with ``av.AudioResampler`` and cuts exact 20 ms frames with
``av.AudioFifo``, so the SIP leg always receives 640-byte frames.
"""

from __future__ import annotations

import av

from .frames import CHANNELS, FRAME_BYTES, SAMPLE_RATE, SAMPLES_PER_FRAME


class PivotResampler:
    """Resample any ``av.AudioFrame`` to 20 ms frames of 16 kHz mono s16 ``bytes``."""

    def __init__(self) -> None:
        layout = "mono" if CHANNELS == 1 else "stereo"
        self._resampler = av.AudioResampler(format="s16", layout=layout, rate=SAMPLE_RATE)
        self._fifo = av.AudioFifo()

    def feed(self, frame: av.AudioFrame) -> list[bytes]:
        """Resample ``frame`` and return the whole 20 ms frames now available."""
        for out in self._resampler.resample(frame):
            # The FIFO checks timestamps for continuity; browser frames may jump
            # (DTX, packet loss), so feed it untimed frames.
            out.pts = None
            self._fifo.write(out)
        frames = []
        while self._fifo.samples >= SAMPLES_PER_FRAME:
            chunk = self._fifo.read(SAMPLES_PER_FRAME)
            if chunk is None:  # pragma: no cover - guarded by the size check
                break
            # The plane may be padded: copy exactly one frame's bytes, once.
            frames.append(bytes(memoryview(chunk.planes[0])[:FRAME_BYTES]))
        return frames
