"""One call inside a worker: a WebRTC leg and a SIP leg joined by a media bridge.

The call ends on both legs whatever ends it first: the browser's hangup, the
phone's BYE or failure, ICE failure, or shutdown. :meth:`BridgedCall.on_sip`
receives the SIP leg's events, and each call reports :class:`CallEnded` once
and :class:`CallReleased` once, after the pjsua2 slot and the peer connection
are both gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from enum import Enum

from gateway.media.bridge import MediaBridge
from gateway.sip.engine import SipEngine
from gateway.sip.events import EndedBy, SipAnswered, SipEnded, SipEvent, SipProgress, SipReleased
from gateway.webrtc.peer import BadOffer, IceServerParams, WebRtcLeg
from gateway.webrtc.tracks import SipAudioTrack
from gateway.workers.ipc import (
    CallAccepted,
    CallAnswer,
    CallEnded,
    CallProgress,
    CallRefused,
    CallReleased,
    FromWorker,
)

logger = logging.getLogger(__name__)


class State(Enum):
    NEW = "new"
    INVITING = "inviting"
    ANSWERED = "answered"
    ENDED = "ended"
    RELEASED = "released"


class BridgedCall:
    """Runs one call in a worker and reports it to the front through ``send``."""

    def __init__(
        self,
        key: int,
        engine: SipEngine,
        ice_servers: Sequence[IceServerParams],
        send: Callable[[FromWorker], None],
        on_released: Callable[[int], None],
        loopback_only: bool = False,
    ) -> None:
        self.key = key
        self.state = State.NEW
        self._engine = engine
        self._ice_servers = ice_servers
        self._send = send
        self._on_released = on_released
        self._loopback_only = loopback_only
        self._bridge = MediaBridge()
        self._webrtc: WebRtcLeg | None = None
        self._sip_placed = False
        self._sip_released = False
        self._media_closed = False
        self._override: tuple[int, str, EndedBy] | None = None
        self._closing: asyncio.Task[None] | None = None

    async def start(self, offer_sdp: str, uri: str) -> None:
        """Answer the browser's offer, then send the INVITE."""
        self._webrtc = WebRtcLeg(self._ice_servers, self._on_webrtc_failed, self._loopback_only)
        try:
            answer = await self._webrtc.answer(offer_sdp, SipAudioTrack(self._bridge.from_sip))
        except BadOffer as exc:
            await self._refuse("bad_request", str(exc))
            return
        except Exception:
            logger.exception("call %s: answering the offer failed", self.key)
            await self._refuse("internal", "the gateway could not answer the offer")
            return
        if self.state is not State.NEW:  # ended while answering
            return
        self._send(CallAnswer(self.key, answer))
        self.state = State.INVITING
        self._sip_placed = True
        self._engine.make_call(self.key, uri, self._bridge.from_sip, self._bridge.to_sip)
        try:
            track = await self._webrtc.remote_audio()
        except Exception:
            return
        if self.state in (State.INVITING, State.ANSWERED):
            self._bridge.start_uplink(track)

    async def _refuse(self, error: str, message: str) -> None:
        self.state = State.ENDED
        self._send(CallRefused(self.key, error, message))
        await self._close_media()
        self._sip_released = True
        self._release()

    def hangup(self, code: int = 0, reason: str = "", by: EndedBy = "local") -> None:
        """End the call from the gateway side; ``code`` overrides what the SIP leg reports."""
        if self.state in (State.ENDED, State.RELEASED):
            return
        if code:
            self._override = (code, reason, by)
        if self._sip_placed:
            self._engine.hangup(self.key)
        else:
            # Still answering the offer: no INVITE yet, nothing to CANCEL.
            self._finish(code or 487, reason or "Request Terminated", by)
            self._sip_released = True

    def _on_webrtc_failed(self, why: str) -> None:
        logger.info("call %s: %s", self.key, why)
        self.hangup(480, why, "gateway")

    def on_sip(self, event: SipEvent) -> None:
        """Handle an event of this call's SIP leg (on the event loop)."""
        if isinstance(event, SipProgress):
            if self.state is State.INVITING:
                self._send(CallProgress(self.key, event.code, event.reason))
        elif isinstance(event, SipAnswered):
            if self.state is State.INVITING:
                self.state = State.ANSWERED
                codec = self._webrtc.codec if self._webrtc else ""
                self._send(CallAccepted(self.key, codec, event.codec))
        elif isinstance(event, SipEnded):
            code, reason, by = self._override or (event.code, event.reason, event.by)
            self._finish(code, reason, by)
        elif isinstance(event, SipReleased):
            self._sip_released = True
            self._release()

    def _finish(self, code: int, reason: str, by: EndedBy) -> None:
        if self.state in (State.ENDED, State.RELEASED):
            return
        self.state = State.ENDED
        stats = self._bridge.stats()
        counters = {
            "uplink_frames": stats.uplink.pushed,
            "uplink_missing": stats.uplink.missing,
            "uplink_dropped": stats.uplink.dropped,
            "downlink_frames": stats.downlink.pushed,
            "downlink_missing": stats.downlink.missing,
            "downlink_dropped": stats.downlink.dropped,
        }
        self._send(CallEnded(self.key, code, reason, by, counters))
        self._closing = asyncio.create_task(self._close_then_release())

    async def _close_then_release(self) -> None:
        await self._close_media()
        self._release()

    async def _close_media(self) -> None:
        await self._bridge.stop()
        if self._webrtc is not None:
            try:
                await self._webrtc.close()
            except Exception:
                logger.exception("call %s: closing the peer connection failed", self.key)
        self._media_closed = True

    def _release(self) -> None:
        if self.state is State.ENDED and self._sip_released and self._media_closed:
            self.state = State.RELEASED
            self._send(CallReleased(self.key))
            self._on_released(self.key)
