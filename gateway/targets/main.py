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
from typing import Any

import pjsua2 as pj

from gateway.ipc import TargetsParams, WorkerFailed, WorkerReady, send_blocking
from gateway.worker.media.frames import SAMPLE_RATE
from gateway.worker.sip.engine import POLL_MS, SipStartError, create_endpoint, set_codecs

logger = logging.getLogger(__name__)

TARGETS = ("echo", "tone")
_USER = re.compile(r"sips?:([^@;>]+)@")


class _TargetCall(pj.Call):  # type: ignore[misc]
    def __init__(self, account: Any, call_id: int, target: str, tone_hz: int) -> None:
        super().__init__(account, call_id)
        self.target = target
        self.tone_hz = tone_hz
        self.tone: Any = None
        self.done = False

    def onCallState(self, prm: Any) -> None:
        if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.done = True

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


class _TargetAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, tone_hz: int) -> None:
        super().__init__()
        self.tone_hz = tone_hz
        self.calls: list[_TargetCall] = []

    def onIncomingCall(self, prm: Any) -> None:
        # One Call object per call id: deleting a pjsua2 Call hangs the call up.
        call = _TargetCall(self, prm.callId, "", self.tone_hz)
        match = _USER.search(call.getInfo().localUri)
        target = call.target = match.group(1) if match else ""
        op = pj.CallOpParam()
        if target not in TARGETS:
            op.statusCode = 404
            op.reason = "No such embedded target"
            call.answer(op)
            call.done = True
        else:
            op.statusCode = 180
            call.answer(op)
            op = pj.CallOpParam()
            op.statusCode = 200
            call.answer(op)
        self.calls.append(call)


def run(sock: socket.socket, params: TargetsParams) -> None:
    """Process entry point: report the bound port on ``sock``, serve until it closes."""
    logging.basicConfig(
        level=params.log_level, format="%(asctime)s targets %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    embedded = params.embedded
    where = f"embedded.bind = {embedded.bind!r}, embedded.port = {embedded.port}"
    try:
        endpoint, transport_id, bound = create_endpoint(
            embedded.bind, embedded.port, params.sip_log_level, 4, "sipgw-embedded", where
        )
    except SipStartError as exc:
        send_blocking(sock, WorkerFailed(str(exc)))
        return
    set_codecs(endpoint, ("PCMU", "PCMA", "G722"))
    account = _TargetAccount(embedded.tone_hz)
    config = pj.AccountConfig()
    config.idUri = f"sip:targets@{embedded.bind}:{bound}"
    config.sipConfig.transportId = transport_id
    config.mediaConfig.transportConfig.port = embedded.rtp_port
    config.mediaConfig.transportConfig.portRange = 100
    config.mediaConfig.transportConfig.boundAddress = embedded.bind
    account.create(config, True)
    send_blocking(sock, WorkerReady(bound))
    logger.info("embedded targets %s on sip:%s:%s", ", ".join(TARGETS), embedded.bind, bound)
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


#: Loop turns a finished call's objects are kept before they are deleted, so the
#: conference bridge (asynchronous since pjproject 2.14) has applied its
#: disconnects and no clock tick can still reach a freed tone generator.
_GRACE_TURNS = 5


def _serve(endpoint: Any, account: _TargetAccount, sock: socket.socket) -> None:
    """Run until the front writes to ``sock`` (stop) or closes it."""
    finished: list[tuple[int, _TargetCall]] = []
    turn = 0
    while not select.select([sock], [], [], 0)[0]:
        endpoint.libHandleEvents(POLL_MS)
        turn += 1
        for done in [c for c in account.calls if c.done]:
            # pjsua already dropped the call's conference port and with it the
            # tone's connection; keep the objects a few turns, then delete.
            account.calls.remove(done)
            finished.append((turn, done))
        while finished and turn - finished[0][0] >= _GRACE_TURNS:
            finished.pop(0)  # the Call and its tone generator are deleted here
    for _, done in finished:
        account.calls.append(done)  # deleted with the rest, before libDestroy


def _hang_up_all(account: _TargetAccount) -> None:
    for call in account.calls:
        try:
            call.hangup(pj.CallOpParam(True))
        except pj.Error:
            pass


def _drop_all(account: _TargetAccount) -> None:
    """Delete every Call and tone generator while the library is alive."""
    account.calls.clear()
