"""The embedded SIP targets: a small pjsua2 phone in its own process.

``sip:echo@...`` answers and sends back what it hears; ``sip:tone@...``
answers and plays a steady tone (1 kHz by default). They are reached over real
SIP and RTP on loopback, exactly like a PBX, so a newcomer can hear a call
without one. Any other user part gets 404. pjsua2 allows one Endpoint per
process, hence the process of its own (started with ``spawn`` by the front).
"""

from __future__ import annotations

import logging
import re
import select
import signal
import socket
import time
from typing import Any

import pjsua2 as pj

from gateway.census import process_census
from gateway.ipc import (
    Census,
    CensusReport,
    TargetsParams,
    WorkerFailed,
    WorkerReady,
    recv_blocking,
    send_blocking,
)
from gateway.limits import SlidingWindow
from gateway.worker.media.frames import SAMPLE_RATE
from gateway.worker.sip.engine import POLL_MS, SipStartError, create_endpoint, set_codecs
from gateway.worker.sip.guard import DROP, PASS, Answer, Policy, RequestGuard, pjsua_library

logger = logging.getLogger(__name__)

TARGETS = ("echo", "tone")
_USER = re.compile(r"sips?:([^@;>]+)@")


class _TargetCall(pj.Call):  # type: ignore[misc]
    def __init__(self, account: _TargetAccount, call_id: int, target: str, tone_hz: int) -> None:
        super().__init__(account, call_id)
        self.account = account
        self.target = target
        self.tone_hz = tone_hz
        self.tone: Any = None

    def onCallState(self, prm: Any) -> None:
        if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
            # Drop the last reference here: the Call is deleted as this callback
            # returns, while pjsua still holds its call id for it. Kept any longer,
            # the id can go to a new call, and deleting this object then hangs
            # that new call up (pjsua2's ~Call acts on whatever call has its id).
            self.account.finished(self)

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()  # keep it alive: .media of a temporary dangles (SWIG)
        for media in info.media:
            if media.type != pj.PJMEDIA_TYPE_AUDIO or media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            audio = self.getAudioMedia(media.index)
            if self.target == "echo":
                audio.startTransmit(audio)
            elif self.tone is None:
                self.tone = pj.ToneGenerator()
                self.tone.createToneGenerator(SAMPLE_RATE, 1)
                tone = pj.ToneDesc()
                tone.freq1 = self.tone_hz
                tone.freq2 = 0
                tone.on_msec = 10000
                tone.off_msec = 0
                tone.volume = 0
                tones = pj.ToneDescVector()
                tones.append(tone)
                self.tone.play(tones, True)
                self.tone.startTransmit(audio)


#: Loop turns an ended call's tone generator is kept, so the conference bridge
#: (asynchronous since pjproject 2.14) has applied the disconnect of the call's
#: port and no clock tick can still reach the deleted generator.
_GRACE_TURNS = 5


class _TargetAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, tone_hz: int) -> None:
        super().__init__()
        self.tone_hz = tone_hz
        #: Calls not yet DISCONNECTED: the only reference keeping each Call alive.
        self.calls: list[_TargetCall] = []
        #: Tone generators of ended calls, with the loop turn they may be deleted at.
        self.retired: list[tuple[int, Any]] = []
        self.turn = 0
        #: Calls to an unknown target, refused on the next turn: refusing a
        #: body-less INVITE inside onIncomingCall aborts the process.
        self.unknown: list[_TargetCall] = []

    def onIncomingCall(self, prm: Any) -> None:
        call = _TargetCall(self, prm.callId, "", self.tone_hz)
        # Listed before answering: a 404 may reach DISCONNECTED inside answer(),
        # and is then deleted as this callback returns, its call id still unused.
        self.calls.append(call)
        match = _USER.search(call.getInfo().localUri)
        target = call.target = match.group(1) if match else ""
        op = pj.CallOpParam()
        if target not in TARGETS:
            self.unknown.append(call)
        else:
            op.statusCode = 180
            call.answer(op)
            op = pj.CallOpParam()
            op.statusCode = 200
            call.answer(op)

    def finished(self, call: _TargetCall) -> None:
        """``call`` is DISCONNECTED: let it go, keeping its tone generator a few turns."""
        if call in self.calls:
            self.calls.remove(call)
        if call.tone is not None:
            self.retired.append((self.turn + _GRACE_TURNS, call.tone))
            call.tone = None

    def refuse_unknown(self) -> None:
        """Answer 404 to the calls for targets that do not exist (outside the callback)."""
        for call in self.unknown:
            op = pj.CallOpParam()
            op.statusCode = 404
            op.reason = "No such embedded target"
            try:
                call.answer(op)
            except pj.Error:
                pass
        self.unknown.clear()

    def reap(self) -> None:
        """Delete the tone generators whose grace turns are over."""
        while self.retired and self.retired[0][0] <= self.turn:
            self.retired.pop(0)


#: New INVITEs a targets process admits per second. Each opens two sockets,
#: whose slots of pjlib's 64-slot pool stay taken 500 ms after the call ends, so
#: a faster stream of short calls would empty the pool and abort the process.
ADMIT_PER_SECOND = 15


def targets_policy(admit: SlidingWindow) -> Policy:
    """The targets answer INVITEs at a bounded rate; excess ones get 503 statelessly."""

    def policy(method: str) -> Answer | None:
        if method == "INVITE":
            return PASS if admit.add() else Answer(503, "Embedded target busy")
        if method == "OPTIONS":
            return PASS
        if method == "ACK":
            return DROP
        return Answer(405, "Method Not Allowed")

    return policy


def run(sock: socket.socket, params: TargetsParams) -> None:
    """Process entry point: report the bound port on ``sock``, serve until it closes."""
    logging.basicConfig(
        level=params.log_level, format="%(asctime)s targets %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    embedded = params.embedded
    where = f"embedded.bind = {embedded.bind!r}, embedded.port = {embedded.port}"
    if params.index:
        where += f" (+ {params.index} for targets process {params.index})"
    try:
        endpoint, transport_id, bound = create_endpoint(
            embedded.bind,
            params.sip_port,
            params.sip_log_level,
            params.max_calls,
            "sipgw-embedded",
            where,
        )
    except SipStartError as exc:
        send_blocking(sock, WorkerFailed(str(exc)))
        return
    guard = RequestGuard(targets_policy(SlidingWindow(ADMIT_PER_SECOND, 1.0)))
    set_codecs(endpoint, ("PCMU", "PCMA", "G722"))
    account = _TargetAccount(embedded.tone_hz)
    config = pj.AccountConfig()
    config.idUri = f"sip:targets@{embedded.bind}:{bound}"
    config.sipConfig.transportId = transport_id
    config.mediaConfig.transportConfig.port = params.rtp_port
    config.mediaConfig.transportConfig.portRange = 100
    config.mediaConfig.transportConfig.boundAddress = embedded.bind
    account.create(config, True)
    send_blocking(sock, WorkerReady(bound))
    logger.info(
        "embedded targets %s on sip:%s:%s (process %s)",
        ", ".join(TARGETS),
        embedded.bind,
        bound,
        params.index,
    )
    try:
        _serve(endpoint, account, sock)
    except OSError:
        pass
    finally:
        _hang_up_all(account)
        for _ in range(20):
            endpoint.libHandleEvents(POLL_MS)
        _drop_all(account)
        for _ in range(5):
            endpoint.libHandleEvents(POLL_MS)
        account.shutdown()
        endpoint.libDestroy()
        del guard  # pjsip pointed at it until libDestroy


#: After a SIGTERM, how long to wait for the front's word before stopping alone.
TERM_GRACE = 10.0


def _serve(endpoint: Any, account: _TargetAccount, sock: socket.socket) -> None:
    """Run until the front says ``Shutdown`` or closes ``sock`` (or long after a SIGTERM).

    A :class:`~gateway.ipc.Census` is answered on the spot, on this thread (the
    pjsua2 owner). A process-group SIGTERM (systemd) reaches this process with
    the front: the front stops it in order, so it only notes the time.
    """
    terminated: list[float] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(time.monotonic()))
    while True:
        if terminated and time.monotonic() - terminated[0] > TERM_GRACE:
            return
        endpoint.libHandleEvents(POLL_MS)
        account.turn += 1
        account.refuse_unknown()
        account.reap()
        if select.select([sock], [], [], 0)[0]:
            message = recv_blocking(sock)
            if not isinstance(message, Census):
                return  # Shutdown, or the front is gone
            send_blocking(sock, CensusReport(message.seq, _census(account)))


def _census(account: _TargetAccount) -> dict[str, Any]:
    """This process's counts, its calls and pjsua's (on the owner thread)."""
    return {
        **process_census(),
        "calls": len(account.calls),
        "pjsua_calls": pjsua_library().pjsua_call_get_count(),
    }


def _hang_up_all(account: _TargetAccount) -> None:
    for call in list(account.calls):
        try:
            call.hangup(pj.CallOpParam(True))
        except pj.Error:
            pass


def _drop_all(account: _TargetAccount) -> None:
    """Delete every Call and tone generator while the library is alive."""
    account.calls.clear()
    account.retired.clear()
