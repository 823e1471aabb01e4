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
import time
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any

from gateway.config import uri_transport
from gateway.ipc import (
    AddCandidate,
    CallAccepted,
    CallAnswer,
    CallControlFailed,
    CallDialog,
    CallDtmf,
    CallEnded,
    CallHold,
    CallIncoming,
    CallProgress,
    CallRefused,
    CallReleased,
    CallTransfer,
    CallTransferRequest,
    ControlCall,
    FromWorker,
    WorkerParams,
)
from gateway.outcomes import End, Ending, Refusal, ending, local_hangup, sip_disconnected
from gateway.worker.media.bridge import MediaBridge
from gateway.worker.sip.engine import SipEngine
from gateway.worker.sip.events import (
    SipAnswered,
    SipControlFailed,
    SipDialog,
    SipDisconnected,
    SipDtmf,
    SipEvent,
    SipFailed,
    SipHold,
    SipIncoming,
    SipMediaTimeout,
    SipProgress,
    SipReleased,
    SipTransfer,
    SipTransferRequest,
)
from gateway.worker.sip.probe import Target, port_closed, udp_target
from gateway.worker.webrtc.peer import BadOffer, WebRtcLeg
from gateway.worker.webrtc.tracks import SipAudioTrack

logger = logging.getLogger(__name__)

#: How long the closed-port probe runs after the INVITE goes out, in seconds.
PROBE_SECONDS = 2.0


class State(Enum):
    ANSWERING = "answering"  # answering the browser's offer; no INVITE yet
    CONNECTING = "connecting"  # waiting for ICE/DTLS (outgoing: no INVITE yet; incoming: accepted)
    RINGING_IN = "ringing_in"  # incoming: 180 sent, the offer is with the browser
    INVITING = "inviting"  # INVITE sent, no response yet (the invite timeout runs)
    EARLY = "early"  # 18x received (the ringing limit runs)
    ANSWERED = "answered"  # 200 OK
    ENDED = "ended"  # the ending is reported; resources are being released
    RELEASED = "released"  # pjsua2 slot and peer connection gone


#: States in which the call is still live on the SIP side.
_LIVE = (State.INVITING, State.EARLY, State.ANSWERED)


def _final_code(result: Ending) -> int:
    """The final response refusing an incoming call that ends with ``result`` unanswered."""
    if 400 <= result.code < 700 and result.code != 487:
        return result.code
    return 486  # the browser hung up before accepting: busy


#: How often the browser's audio is checked for ``calls.media_timeout``, in seconds.
UPLINK_CHECK_INTERVAL = 1.0


class BridgedCall:
    """Runs one call in a worker and reports it to the front through ``send``.

    Every wait has a bound (``calls`` settings): ICE/DTLS set-up, the first
    response to the INVITE, ringing, the call's duration, and silence on either
    leg. Each bound is one timer; whichever fires ends the call on both legs.
    """

    def __init__(
        self,
        key: int,
        engine: SipEngine,
        params: WorkerParams,
        send: Callable[[FromWorker], None],
        on_released: Callable[[int], None],
        loopback_only: bool = False,
    ) -> None:
        self.key = key
        self.state = State.ANSWERING
        self._engine = engine
        self._params = params
        self._limits = params.calls
        self._send = send
        self._on_released = on_released
        self._loopback_only = loopback_only
        self._bridge = MediaBridge()
        self._webrtc: WebRtcLeg | None = None
        self._uri = ""
        self._account = 0
        self._local = False
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._media_up = False
        self._uplink_seen = (-1, 0.0)  # (frames pushed, when that count was first seen)
        #: This call's own bound on its answered life (the token's ``max_duration``; 0: none).
        self.max_duration = 0.0
        #: Extra headers for the INVITE (checked by the front).
        self.headers: tuple[tuple[str, str], ...] = ()
        #: Trickled candidates that came before the WebRTC leg existed.
        self._queued_candidates: list[AddCandidate] = []
        self._sip_released = True  # until an INVITE goes out
        #: An incoming call (the phone called a registered browser user).
        self._incoming = False
        self._media_closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: The browser's request ids of pending hold/unhold/dtmf requests, by action.
        self._requests: dict[str, str | None] = {}
        self._handlers: dict[type[SipEvent], Callable[[Any], None]] = {
            SipProgress: self._on_progress,
            SipAnswered: self._on_answered,
            SipDisconnected: self._on_disconnected,
            SipFailed: self._on_failed,
            SipDialog: self._on_dialog,
            SipMediaTimeout: self._on_sip_media_timeout,
            SipHold: self._on_hold,
            SipDtmf: self._on_dtmf,
            SipTransfer: self._on_transfer,
            SipTransferRequest: self._on_transfer_request,
            SipControlFailed: self._on_control_failed,
            SipReleased: self._on_released_by_sip,
        }

    async def start(self, offer_sdp: str, uri: str, account: int = 0, local: bool = False) -> None:
        """Answer the browser's offer; send the INVITE once ICE and DTLS are up.

        With ``calls.invite_after_ice = false`` the INVITE goes out right after
        the answer and the set-up timeout runs alongside it. ``local``: ``uri`` is
        an embedded target (loopback UDP, no SRTP); any other URI goes to the PBX
        over ``sip.transport``.
        """
        self._local = local
        self._uri = uri if local else self._params.sip.target_uri(uri)
        self._account = account
        self._webrtc = WebRtcLeg(
            self._params.ice_servers,
            self._on_webrtc_lost,
            self._loopback_only,
            on_digit=self._on_browser_digit,
        )
        self._take_queued_candidates(self._webrtc)
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
        self.state = State.CONNECTING
        self._arm("setup", self._limits.setup_timeout, self._on_setup_timeout)
        self._spawn(self._pump_uplink())
        if not self._limits.invite_after_ice:
            self._invite()
        try:
            await self._webrtc.connected()
        except ConnectionError as exc:
            if self.state in (State.CONNECTING, *_LIVE) and not self._media_up:
                self.hangup(ending(End.ICE_FAILED, reason=f"ICE connection failed: {exc}"))
            return
        if self.state not in (State.CONNECTING, *_LIVE):
            return
        self._media_up = True
        self._disarm("setup")
        self._watch_uplink()
        if self.state is State.CONNECTING:
            self._invite()

    def _invite(self) -> None:
        self.state = State.INVITING
        self._sip_released = False
        self._arm("invite", self._params.sip.invite_timeout, self._on_invite_timeout)
        self._engine.make_call(
            self.key,
            self._uri,
            self._bridge.from_sip,
            self._bridge.to_sip,
            self._account,
            self.headers,
            self._local,
        )
        target = udp_target(self._uri)
        if target is not None:
            self._spawn(self._probe(target))

    async def _probe(self, target: Target) -> None:
        if await port_closed(target, PROBE_SECONDS) and self.state is State.INVITING:
            where = f"{target.host}:{target.port}"
            self.hangup(
                ending(
                    End.TARGET_UNREACHABLE, reason=f"SIP target unreachable: {where} port closed"
                )
            )

    # --- incoming calls ---------------------------------------------------------------

    async def start_incoming(self, event: SipIncoming) -> None:
        """A registered user's phone rings: make the browser's offer and hand it on."""
        self._incoming = True
        self._sip_released = False
        self._webrtc = WebRtcLeg(
            self._params.ice_servers,
            self._on_webrtc_lost,
            self._loopback_only,
            on_digit=self._on_browser_digit,
        )
        self._take_queued_candidates(self._webrtc)
        try:
            offer = await self._webrtc.offer(SipAudioTrack(self._bridge.from_sip))
        except Exception:
            if self.state is State.ANSWERING:
                logger.exception("call %s: making the offer failed", self.key)
                self.hangup(ending(End.PLACE_FAILED, reason="the gateway could not make an offer"))
            return
        if self.state is not State.ANSWERING:
            return
        self.state = State.RINGING_IN
        self._send(
            CallIncoming(
                self.key, event.reg, event.from_uri, event.display_name, event.to_uri, offer
            )
        )
        seconds = self._params.registrar.ring_timeout
        self._arm("ringing", seconds, self._on_ringing_timeout)
        self._spawn(self._pump_uplink())

    async def accept(self, answer_sdp: str) -> None:
        """The browser accepted: apply its answer, then answer the phone once ICE is up."""
        if self.state is not State.RINGING_IN or self._webrtc is None:
            return
        self._disarm("ringing")
        self.state = State.CONNECTING
        self._arm("setup", self._limits.setup_timeout, self._on_setup_timeout)
        try:
            await self._webrtc.accept(answer_sdp)
        except BadOffer as exc:
            self.hangup(ending(End.BAD_ANSWER, reason=f"{End.BAD_ANSWER.value.reason}: {exc}"))
            return
        try:
            await self._webrtc.connected()
        except ConnectionError as exc:
            if self.state is State.CONNECTING:
                self.hangup(ending(End.ICE_FAILED, reason=f"ICE connection failed: {exc}"))
            return
        if self.state is not State.CONNECTING:
            return
        self._media_up = True
        self._disarm("setup")
        self._watch_uplink()
        self._engine.answer_incoming(self.key, self._bridge.from_sip, self._bridge.to_sip)

    def reject(self, code: int) -> None:
        """The browser refused the incoming call with ``code``."""
        if self.state in (State.RINGING_IN, State.CONNECTING):
            self.hangup(ending(End.LOCAL_REJECT, code, f"Rejected ({code})"))

    async def _pump_uplink(self) -> None:
        assert self._webrtc is not None
        try:
            track = await self._webrtc.remote_audio()
        except Exception:
            return
        if self.state in (State.CONNECTING, *_LIVE):
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
        placed = self.state in _LIVE or self._incoming
        result = override or local_hangup(answered=self.state is State.ANSWERED)
        self._finish(result)
        if placed:
            self._engine.hangup(self.key, _final_code(result) if self._incoming else 0)

    def control(self, request: ControlCall) -> None:
        """A browser's in-call request: hold, unhold, DTMF digits or a transfer."""
        if self.state is not State.ANSWERED:
            self._send(
                CallControlFailed(
                    self.key, "wrong_state", "the call is not answered", request.request_id
                )
            )
            return
        self._requests[request.action] = request.request_id
        if request.action == "dtmf":
            self._engine.send_dtmf(self.key, request.digits, request.method)
        elif request.action == "transfer":
            self._engine.transfer(self.key, request.uri, request.replaces)
        else:
            self._engine.hold(self.key, request.action == "hold")

    def add_candidate(self, request: AddCandidate) -> None:
        """A trickled ICE candidate of the browser (outgoing calls and accepted incoming ones)."""
        leg = self._webrtc
        if leg is None:
            # The StartCall's task has not run yet (the candidate came right after
            # the offer): the leg takes it as soon as it exists.
            if self.state not in (State.ENDED, State.RELEASED):
                self._queued_candidates.append(request)
            return
        self._spawn(self._add_candidate(leg, request))

    def _take_queued_candidates(self, leg: WebRtcLeg) -> None:
        for request in self._queued_candidates:
            self._spawn(self._add_candidate(leg, request))
        self._queued_candidates.clear()

    async def _add_candidate(self, leg: WebRtcLeg, request: AddCandidate) -> None:
        try:
            await leg.add_candidate(request.candidate, request.sdp_mid, request.sdp_mline_index)
        except BadOffer as exc:
            self._send(CallControlFailed(self.key, "bad_request", str(exc), request.request_id))
        except Exception:
            logger.exception("call %s: adding a trickled candidate failed", self.key)
            self._send(
                CallControlFailed(
                    self.key,
                    "bad_request",
                    "candidate: the ICE agent refused it",
                    request.request_id,
                )
            )

    # --- timers -------------------------------------------------------------------

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._disarm(name)
        if delay > 0:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _on_setup_timeout(self) -> None:
        self._timers.pop("setup", None)
        seconds = self._limits.setup_timeout
        self.hangup(
            ending(
                End.ICE_FAILED, reason=f"ICE connection failed: not connected after {seconds:g} s"
            )
        )

    def _on_invite_timeout(self) -> None:
        self._timers.pop("invite", None)
        if self.state is State.INVITING:
            self.hangup(ending(End.INVITE_TIMEOUT))

    def _on_ringing_timeout(self) -> None:
        self._timers.pop("ringing", None)
        if self.state is State.RINGING_IN:
            seconds = self._params.registrar.ring_timeout
            self.hangup(ending(End.NO_ANSWER, reason=f"No answer after {seconds:g} s of ringing"))
        elif self.state is State.EARLY:
            seconds = self._limits.max_ringing
            self.hangup(ending(End.NO_ANSWER, reason=f"No answer after {seconds:g} s of ringing"))

    def _on_duration_limit(self) -> None:
        self._timers.pop("duration", None)
        if self.state is State.ANSWERED:
            self.hangup(ending(End.MAX_DURATION))

    def _watch_uplink(self) -> None:
        """Check every second that the browser's audio still arrives."""
        timeout = self._limits.media_timeout
        if not timeout or self.state in (State.ENDED, State.RELEASED):
            return
        now = time.monotonic()
        frames = self._bridge.to_sip.pushed
        if frames != self._uplink_seen[0]:
            self._uplink_seen = (frames, now)
        elif now - self._uplink_seen[1] >= timeout:
            self.hangup(
                ending(
                    End.MEDIA_TIMEOUT,
                    reason=f"Media timeout: no audio from the browser for {timeout:g} s",
                )
            )
            return
        self._arm("uplink", UPLINK_CHECK_INTERVAL, self._watch_uplink)

    def _on_browser_digit(self, digit: str, duration_ms: int) -> None:
        """A digit the browser sent in its RTP (RFC 4733): on to the phone, once answered."""
        if self.state is State.ANSWERED:
            logger.debug(
                "call %s: in-band digit %s (%d ms) from the browser", self.key, digit, duration_ms
            )
            self._engine.send_dtmf(self.key, digit, "auto")

    def _on_webrtc_lost(self, why: str) -> None:
        logger.info("call %s: %s", self.key, why)
        if self._media_up:
            self.hangup(ending(End.WEBRTC_LOST, reason=f"WebRTC connection lost: {why}"))

    # --- the SIP leg's events (on the event loop) ---------------------------------------

    def on_sip(self, event: SipEvent) -> None:
        self._handlers[type(event)](event)

    def _on_progress(self, event: SipProgress) -> None:
        if self.state in (State.INVITING, State.EARLY):
            self._disarm("invite")
            if self.state is State.INVITING:
                self._arm("ringing", self._limits.max_ringing, self._on_ringing_timeout)
            self.state = State.EARLY
            self._send(CallProgress(self.key, event.code, event.reason))

    def _on_answered(self, event: SipAnswered) -> None:
        if self.state in (State.INVITING, State.EARLY) or (
            self._incoming and self.state is State.CONNECTING
        ):
            self._disarm("invite")
            self._disarm("ringing")
            limits = [d for d in (self._limits.max_duration, self.max_duration) if d > 0]
            self._arm("duration", min(limits, default=0.0), self._on_duration_limit)
            self.state = State.ANSWERED
            codec = self._webrtc.codec if self._webrtc else ""
            self._send(CallAccepted(self.key, codec, event.codec))

    def _on_disconnected(self, event: SipDisconnected) -> None:
        logger.debug("call %s: SIP leg ended: %s %s", self.key, event.code, event.reason)
        if self._incoming and self.state in (State.ANSWERING, State.RINGING_IN, State.CONNECTING):
            self._finish(ending(End.REMOTE_CANCEL))
        elif event.replaced and self.state is State.ANSWERED:
            self._finish(ending(End.TRANSFERRED))
        elif self.state in _LIVE:
            answered = self.state is State.ANSWERED
            tls = not self._local and uri_transport(self._uri) == "tls"
            self._finish(
                sip_disconnected(
                    event.code,
                    event.reason,
                    answered=answered,
                    tls_failed=tls and event.transport_failed,
                )
            )

    def _on_failed(self, event: SipFailed) -> None:
        if self.state in _LIVE:
            self._finish(event.ending)

    def _on_dialog(self, event: SipDialog) -> None:
        if self.state in _LIVE:
            self._send(CallDialog(self.key, event.dialog))

    def _on_sip_media_timeout(self, event: SipMediaTimeout) -> None:
        if self.state is State.ANSWERED:
            reason = f"Media timeout: no RTP from the SIP side for {event.seconds:g} s"
            self.hangup(ending(End.MEDIA_TIMEOUT, reason=reason))

    def _on_hold(self, event: SipHold) -> None:
        if self.state is State.ANSWERED:
            action = "hold" if event.held else "unhold"
            request_id = self._requests.pop(action, None) if event.by == "local" else None
            self._send(CallHold(self.key, event.held, event.by, request_id))

    def _on_dtmf(self, event: SipDtmf) -> None:
        if self.state is State.ANSWERED:
            self._send(CallDtmf(self.key, event.digit, event.method, event.duration))

    def _on_transfer(self, event: SipTransfer) -> None:
        """Relay the transfer's progress; its success ends this call (BYE)."""
        if self.state is not State.ANSWERED:
            return
        request_id = self._requests.pop("transfer", None) if event.final else None
        self._send(CallTransfer(self.key, event.code, event.reason, event.final, request_id))
        if event.final and 200 <= event.code < 300:
            self.hangup(ending(End.TRANSFERRED))

    def _on_transfer_request(self, event: SipTransferRequest) -> None:
        if self.state is State.ANSWERED:
            self._send(CallTransferRequest(self.key, event.target))

    def _on_control_failed(self, event: SipControlFailed) -> None:
        if self.state is State.ANSWERED:
            request_id = self._requests.pop(event.action, None)
            self._send(CallControlFailed(self.key, "unavailable", event.message, request_id))

    def _on_released_by_sip(self, event: SipReleased) -> None:
        self._sip_released = True
        self._release()

    # --- ending and releasing ---------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, result: Ending) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
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
        self._spawn(self._close_then_release())

    async def _close_then_release(self) -> None:
        await self._close_media()
        self._release()

    async def _close_media(self) -> None:
        current = asyncio.current_task()
        for task in [t for t in self._tasks if t is not current]:
            task.cancel()
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
