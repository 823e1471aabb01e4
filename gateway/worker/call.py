"""One call inside a worker: a WebRTC leg and a SIP leg joined by a media bridge.

:class:`BridgedCall` is the worker's only call state machine. The SIP engine
reports what pjsip saw (:mod:`gateway.worker.sip.events`); the call decides
what that means through :mod:`gateway.outcomes` and reports it to the front.
It ends on both legs whatever ends it first: the browser's hangup, the phone's
BYE or failure, the invite timeout, ICE failure, or shutdown. Each call reports
:class:`~gateway.ipc.CallEnded` once, then :class:`~gateway.ipc.CallReleased`
once, after the pjsua2 slot and the peer connection are both gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from gateway.config import IceServer
from gateway.ipc import (
    CallAccepted,
    CallAnswer,
    CallDialog,
    CallEnded,
    CallProgress,
    CallRefused,
    CallReleased,
    FromWorker,
)
from gateway.outcomes import End, Ending, Refusal, ending, local_hangup, sip_disconnected
from gateway.worker.media.bridge import MediaBridge
from gateway.worker.sip.engine import SipEngine
from gateway.worker.sip.events import (
    SipAnswered,
    SipDialog,
    SipDisconnected,
    SipEvent,
    SipFailed,
    SipProgress,
    SipReleased,
)
from gateway.worker.webrtc.peer import BadOffer, WebRtcLeg
from gateway.worker.webrtc.tracks import SipAudioTrack

logger = logging.getLogger(__name__)


class State(Enum):
    ANSWERING = "answering"  # answering the browser's offer; no INVITE yet
    INVITING = "inviting"  # INVITE sent, no response yet (the invite timeout runs)
    EARLY = "early"  # 18x received
    ANSWERED = "answered"  # 200 OK
    ENDED = "ended"  # the ending is reported; resources are being released
    RELEASED = "released"  # pjsua2 slot and peer connection gone


#: States in which the call is still live on the SIP side.
_LIVE = (State.INVITING, State.EARLY, State.ANSWERED)


class BridgedCall:
    """Runs one call in a worker and reports it to the front through ``send``."""

    def __init__(
        self,
        key: int,
        engine: SipEngine,
        ice_servers: Sequence[IceServer],
        send: Callable[[FromWorker], None],
        on_released: Callable[[int], None],
        invite_timeout: float,
        loopback_only: bool = False,
    ) -> None:
        self.key = key
        self.state = State.ANSWERING
        self._engine = engine
        self._ice_servers = ice_servers
        self._send = send
        self._on_released = on_released
        self._invite_timeout = invite_timeout
        self._loopback_only = loopback_only
        self._bridge = MediaBridge()
        self._webrtc: WebRtcLeg | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sip_released = True  # until an INVITE goes out
        self._media_closed = False
        self._closing: asyncio.Task[None] | None = None
        self._handlers: dict[type[SipEvent], Callable[[Any], None]] = {
            SipProgress: self._on_progress,
            SipAnswered: self._on_answered,
            SipDisconnected: self._on_disconnected,
            SipFailed: self._on_failed,
            SipDialog: self._on_dialog,
            SipReleased: self._on_released_by_sip,
        }

    async def start(self, offer_sdp: str, uri: str) -> None:
        """Answer the browser's offer, then send the INVITE."""
        self._webrtc = WebRtcLeg(self._ice_servers, self._on_webrtc_failed, self._loopback_only)
        try:
            answer = await self._webrtc.answer(offer_sdp, SipAudioTrack(self._bridge.from_sip))
        except Exception as exc:
            if self.state is not State.ANSWERING:
                return  # hung up while answering: its peer connection was closed under it
            if isinstance(exc, BadOffer):
                await self._refuse(Refusal.BAD_OFFER, str(exc))
            else:
                logger.exception("call %s: answering the offer failed", self.key)
                await self._refuse(Refusal.ANSWER_FAILED, "the gateway could not answer the offer")
            return
        if self.state is not State.ANSWERING:  # ended while answering
            return
        self._send(CallAnswer(self.key, answer))
        self.state = State.INVITING
        self._sip_released = False
        self._timer = asyncio.get_running_loop().call_later(
            self._invite_timeout, self._on_invite_timeout
        )
        self._engine.make_call(self.key, uri, self._bridge.from_sip, self._bridge.to_sip)
        try:
            track = await self._webrtc.remote_audio()
        except Exception:
            return
        if self.state in _LIVE:
            self._bridge.start_uplink(track)

    async def _refuse(self, refusal: Refusal, message: str) -> None:
        self.state = State.ENDED
        self._send(CallRefused(self.key, refusal, message))
        await self._close_media()
        self._release()

    def hangup(self, override: Ending | None = None) -> None:
        """End the call from the gateway side: the browser's hangup, or ``override``.

        The browser hears the ending at once; the SIP leg's CANCEL or BYE follows
        (pjsip may have to wait for a provisional response before it can CANCEL).
        """
        if self.state in (State.ENDED, State.RELEASED):
            return
        placed = self.state in _LIVE
        self._finish(override or local_hangup(answered=self.state is State.ANSWERED))
        if placed:
            self._engine.hangup(self.key)

    def _on_webrtc_failed(self, why: str) -> None:
        logger.info("call %s: %s", self.key, why)
        self.hangup(ending(End.ICE_FAILED))

    def _on_invite_timeout(self) -> None:
        self._timer = None
        if self.state is State.INVITING:
            self.hangup(ending(End.INVITE_TIMEOUT))

    # --- the SIP leg's events (on the event loop) ---------------------------------------

    def on_sip(self, event: SipEvent) -> None:
        self._handlers[type(event)](event)

    def _on_progress(self, event: SipProgress) -> None:
        if self.state in (State.INVITING, State.EARLY):
            self._stop_timer()
            self.state = State.EARLY
            self._send(CallProgress(self.key, event.code, event.reason))

    def _on_answered(self, event: SipAnswered) -> None:
        if self.state in (State.INVITING, State.EARLY):
            self._stop_timer()
            self.state = State.ANSWERED
            codec = self._webrtc.codec if self._webrtc else ""
            self._send(CallAccepted(self.key, codec, event.codec))

    def _on_disconnected(self, event: SipDisconnected) -> None:
        if self.state in _LIVE:
            answered = self.state is State.ANSWERED
            self._finish(sip_disconnected(event.code, event.reason, answered=answered))

    def _on_failed(self, event: SipFailed) -> None:
        if self.state in _LIVE:
            self._finish(event.ending)

    def _on_dialog(self, event: SipDialog) -> None:
        if self.state in _LIVE:
            self._send(CallDialog(self.key, event.dialog))

    def _on_released_by_sip(self, event: SipReleased) -> None:
        self._sip_released = True
        self._release()

    # --- ending and releasing ---------------------------------------------------------

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, result: Ending) -> None:
        self._stop_timer()
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
        self._send(CallEnded(self.key, result, counters))
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
