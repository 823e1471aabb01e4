"""The media bridge of one call: two bounded PCM buffers and the uplink pump.

Downlink (SIP -> browser): the SIP leg's media port pushes 20 ms frames into
``from_sip``; :class:`~gateway.worker.webrtc.tracks.SipAudioTrack` pops them.
Uplink (browser -> SIP): :meth:`MediaBridge.run_uplink` reads the browser's
decoded frames, resamples them to the pivot format with PyAV and pushes them
into ``to_sip``, which the media port pops on pjmedia's clock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from .buffers import BufferStats, FrameBuffer
from .transcode import PivotResampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BridgeStats:
    """Frame counts of both directions of one call."""

    uplink: BufferStats  # browser -> SIP
    downlink: BufferStats  # SIP -> browser


class MediaBridge:
    """Joins one WebRTC leg and one SIP leg through two bounded buffers."""

    def __init__(self, depth: int = 6, prefill: int = 2) -> None:
        # pjmedia's clock pulls the uplink steadily while aiortc delivers decoded
        # frames in bursts: 40 ms of prefill absorbs that.
        self.from_sip = FrameBuffer(depth)
        self.to_sip = FrameBuffer(depth, prefill)
        self._uplink: asyncio.Task[None] | None = None

    def start_uplink(self, track: Any) -> None:
        """Start pumping the browser's audio ``track`` toward the SIP leg."""
        if self._uplink is None:
            self._uplink = asyncio.create_task(self._run_uplink(track), name="uplink")

    async def _run_uplink(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        resampler = PivotResampler()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("uplink stopped")
                return
            for chunk in resampler.feed(frame):
                self.to_sip.push(chunk)

    async def stop(self) -> None:
        """Stop the uplink pump and drop buffered audio."""
        if self._uplink is not None:
            self._uplink.cancel()
            try:
                await self._uplink
            except asyncio.CancelledError:
                pass
            self._uplink = None
        self.from_sip.clear()
        self.to_sip.clear()

    def stats(self) -> BridgeStats:
        return BridgeStats(uplink=self.to_sip.stats(), downlink=self.from_sip.stats())
