"""The SIP leg: one pjsua2 Endpoint per process, driven by one owner thread.

pjsua2 is created with ``threadCnt = 0`` and ``mainThreadOnly = True`` and is
only ever touched from the thread started here, which alternates between
``libHandleEvents`` and the command queue. The event loop talks to it through
:meth:`SipEngine.make_call` / :meth:`SipEngine.hangup` (queued commands, each
run by its handler) and hears back through ``loop.call_soon_threadsafe`` with
the frozen facts of :mod:`gateway.worker.sip.events`. Audio never passes
through here: each call's :class:`~gateway.worker.sip.media_port.BridgePort`
is fed by pjmedia's clock thread.

This is the only module of the worker that imports pjsua2 (with its media
port and the embedded targets, which share :func:`create_endpoint`).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pjsua2 as pj

from gateway.config import SipConfig
from gateway.ipc import Dialog, WorkerParams
from gateway.limits import SlidingWindow
from gateway.outcomes import place_failed
from gateway.worker.media.buffers import FrameBuffer
from gateway.worker.media.frames import PTIME_MS, SAMPLE_RATE

from .dialog import from_invite, with_response
from .events import (
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
    SipRegistration,
    SipReleased,
    SipTransfer,
    SipTransferRequest,
)
from .guard import DROP, PASS, Answer, RequestGuard, TrustedPeers, pjsua_library
from .media_port import BridgePort, PortPool

logger = logging.getLogger(__name__)

#: How long one ``libHandleEvents`` call may block, in ms (bounds command latency).
POLL_MS = 10

#: INVITEs a worker with registered users lets through to pjsua per second.
INCOMING_PER_SECOND = 5

#: How often answered calls are checked for incoming RTP, in seconds.
RTP_CHECK_INTERVAL = 1.0

#: ``sip.session_timers`` values as pjsua knows them.
_TIMER_USE = {
    "off": pj.PJSUA_SIP_TIMER_INACTIVE,
    "optional": pj.PJSUA_SIP_TIMER_OPTIONAL,
    "required": pj.PJSUA_SIP_TIMER_REQUIRED,
    "always": pj.PJSUA_SIP_TIMER_ALWAYS,
}

#: ``sip.srtp`` values as pjsua knows them.
_SRTP_USE = {
    "off": pj.PJMEDIA_SRTP_DISABLED,
    "optional": pj.PJMEDIA_SRTP_OPTIONAL,
    "mandatory": pj.PJMEDIA_SRTP_MANDATORY,
}
#: ``AccountMediaConfig.srtpSecureSignaling``: SRTP only when the hop that carries
#: the SDP (and so its SDES keys) is TLS (pjsua's 2 would want sips: end to end).
_SECURE_HOP = 1

#: Media states in which the call's conference port carries audio to or from us.
_CONNECTED_STATES = (pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD)

#: Static-payload codec names as pjsua2 knows them.
_CODEC_IDS = {"PCMU": "PCMU/8000/1", "PCMA": "PCMA/8000/1", "G722": "G722/16000/1"}


class SipStartError(RuntimeError):
    """The SIP stack could not start; the message names the setting and the OS error."""


@dataclass(frozen=True)
class _MakeCall:
    key: int
    uri: str
    from_sip: FrameBuffer
    to_sip: FrameBuffer
    account: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    #: An embedded target: the loopback account (UDP, no SRTP).
    local: bool = False


@dataclass(frozen=True)
class _Hangup:
    key: int
    #: Final response for an incoming call not yet answered (0: pjsua's 603).
    code: int = 0


@dataclass(frozen=True)
class _Register:
    reg: int
    user: str
    password: str = field(repr=False)
    auth_user: str
    display_name: str


@dataclass(frozen=True)
class _Unregister:
    reg: int


@dataclass(frozen=True)
class _AnswerIncoming:
    key: int
    from_sip: FrameBuffer
    to_sip: FrameBuffer


@dataclass(frozen=True)
class _Hold:
    key: int
    hold: bool


@dataclass(frozen=True)
class _SendDtmf:
    key: int
    digits: str
    method: str


@dataclass(frozen=True)
class _Transfer:
    key: int
    uri: str
    #: Attended: the key of the call the far end is to replace (-1: blind).
    replaces: int = -1


_Command = (
    _MakeCall | _Hangup | _Hold | _SendDtmf | _Transfer | _Register | _Unregister | _AnswerIncoming
)

#: DTMF methods as the protocol names them and as pjsua knows them.
_DTMF_METHODS = {
    "rfc4733": pj.PJSUA_DTMF_METHOD_RFC2833,
    "info": pj.PJSUA_DTMF_METHOD_SIP_INFO,
}
_DTMF_NAMES = {value: name for name, value in _DTMF_METHODS.items()}
#: ``pjmedia_stream_dtmf_event.flags``: the event's last packet (pjmedia/stream.h).
_DTMF_IS_END = 1 << 1
#: pjsua's "duration not known" (PJSUA_UNKNOWN_DTMF_DURATION, all bits set).
_UNKNOWN_DURATION = 0xFFFFFFFF
#: Duration of each digit sent, in ms (pjsua's default is 160).
DTMF_DURATION_MS = 160


@contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Silence stdout and stderr at the descriptor level, where pjlib's log writes.

    pjlib prints its banner before any configured log level applies, and logs
    a failed bind as an error before raising it (the caller reports it).
    """
    if not quiet:
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def create_endpoint(
    bind: str, port: int, log_level: int, max_calls: int, user_agent: str, where: str
) -> tuple[Any, int, int]:
    """Create and start this process's Endpoint; returns it, its UDP transport id and port.

    Must run on the thread that will own pjsua2 from then on. ``where`` names the
    settings behind ``bind``/``port`` for the error raised when the port cannot
    be bound (:class:`SipStartError`).
    """
    endpoint = pj.Endpoint()
    with _quiet(log_level < 4):
        endpoint.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 0
    config.uaConfig.mainThreadOnly = True
    config.uaConfig.maxCalls = max_calls
    config.uaConfig.userAgent = user_agent
    config.logConfig.level = log_level
    config.logConfig.consoleLevel = log_level
    config.medConfig.clockRate = SAMPLE_RATE
    config.medConfig.sndClockRate = SAMPLE_RATE
    config.medConfig.audioFramePtime = PTIME_MS
    config.medConfig.ecTailLen = 0  # no echo canceller: the bridge is not a speakerphone
    config.medConfig.noVad = True
    endpoint.libInit(config)
    endpoint.audDevManager().setNullDev()
    transport_config = pj.TransportConfig()
    transport_config.port = port
    transport_config.boundAddress = bind
    try:
        with _quiet(log_level < 4):
            transport_id = endpoint.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport_config)
    except pj.Error as exc:
        endpoint.libDestroy()
        raise SipStartError(
            f"{where}: cannot listen for SIP on UDP {bind}:{port or 'any'}: {exc.reason}"
        ) from None
    local_name = endpoint.transportGetInfo(transport_id).localName
    bound_port = int(local_name.rsplit(":", 1)[1])
    endpoint.libStart()
    return endpoint, transport_id, bound_port


def create_tls_transport(endpoint: Any, sip: SipConfig, port: int, where: str) -> tuple[int, int]:
    """Open the SIP/TLS transport on ``sip.bind``; returns its id and bound port.

    Its settings serve both ways: the connections the worker opens to the PBX
    (checked against ``sip.tls_ca`` when ``sip.tls_verify``; ``sip.tls_cert``
    shown when asked) and the ones a PBX opens to it. TLS 1.2 only: the wheel's
    OpenSSL 1.0.2k has nothing newer, and TLS 1.0/1.1 are deprecated (RFC 8996).
    """
    config = pj.TransportConfig()
    config.port = port
    config.boundAddress = sip.bind
    tls = config.tlsConfig
    tls.CaListFile = sip.tls_ca
    tls.certFile = sip.tls_cert
    tls.privKeyFile = sip.tls_key
    tls.method = pj.PJSIP_TLSV1_2_METHOD
    tls.proto = pj.PJ_SSL_SOCK_PROTO_TLS1_2
    # verifyServer checks the chain and that the certificate names the host of
    # the URI dialled (subjectAltName DNS or IP, else the CN); a failure ends the
    # call with 503 before anything is sent.
    tls.verifyServer = sip.tls_verify
    # A PBX connecting to us (requests to a registered user) is not asked for a
    # certificate: it is authenticated as any other peer (sip.trusted_peers).
    tls.verifyClient = False
    tls.requireClientCert = False
    tls.sockOptParams = _no_delay()
    try:
        with _quiet(sip.log_level < 4):
            transport_id = endpoint.transportCreate(pj.PJSIP_TRANSPORT_TLS, config)
    except pj.Error as exc:
        raise SipStartError(
            f"{where}: cannot listen for SIP on TLS {sip.bind}:{port or 'any'}: {exc.reason}"
        ) from None
    local_name = endpoint.transportGetInfo(transport_id).localName
    return transport_id, int(local_name.rsplit(":", 1)[1])


def _no_delay() -> Any:
    """TCP_NODELAY for the TLS connections, which pjsip leaves off.

    Without it the kernel holds a small write (a 180 right after 100 Trying, a
    CANCEL right after its INVITE) until the previous one is acknowledged, and a
    PBX that delays its ACKs makes that ~40 ms each time: measured from the
    phone's side, where it doubled call set-up (bench/sip_tls.py).
    """
    option = pj.SockOpt()
    option.level = socket.IPPROTO_TCP
    option.optName = socket.TCP_NODELAY
    option.setOptValInt(1)
    params = pj.SockOptParams()
    params.sockOpts.append(option)
    return params


def set_codecs(endpoint: Any, codecs: tuple[str, ...]) -> None:
    """Offer exactly ``codecs`` on the SIP leg, in that order of preference."""
    wanted = {_CODEC_IDS[name]: 250 - i for i, name in enumerate(codecs)}
    for info in endpoint.codecEnum2():
        endpoint.codecSetPriority(info.codecId, wanted.get(info.codecId, 0))


#: Incoming calls are not enabled yet: the guard refuses every new INVITE.
REFUSE_INVITE = Answer(480, "Incoming calls are not enabled on this gateway")


def worker_policy(method: str) -> Answer | None:
    """What a worker does with a new out-of-dialog request (see :mod:`.guard`)."""
    if method == "OPTIONS":
        return PASS  # pjsua answers 200: PBXes use it to check the gateway is up
    if method == "ACK":
        return DROP  # the ACK of a stateless refusal
    if method == "INVITE":
        return REFUSE_INVITE
    return Answer(405, "Method Not Allowed")


class _UnwantedCall(pj.Call):  # type: ignore[misc]
    """An incoming call that got past the guard: refused on the next loop turn."""

    def __init__(self, account: Any, call_id: int) -> None:
        super().__init__(account, call_id)
        self.refused = False
        self.disconnected = False

    def onCallState(self, prm: Any) -> None:
        if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True


class _Account(pj.Account):  # type: ignore[misc]
    """The worker's SIP identity. Incoming calls are not handled yet.

    The guard refuses INVITEs before this sees them; should one get here anyway,
    it is not refused inside the callback (refusing a body-less INVITE there
    aborts the process) but on the engine's next turn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unwanted: list[_UnwantedCall] = []

    def onIncomingCall(self, prm: Any) -> None:
        self.unwanted.append(_UnwantedCall(self, prm.callId))


class _UserAccount(pj.Account):  # type: ignore[misc]
    """A browser user's registration: reports its state, takes its incoming calls."""

    def __init__(self, engine: SipEngine, reg: int) -> None:
        super().__init__()
        self.engine = engine
        self.reg = reg

    def onRegState(self, prm: Any) -> None:
        info = self.getInfo()
        active = bool(info.regIsActive) and 200 <= prm.code < 300
        expires = int(info.regExpiresSec) if active else 0
        self.engine.emit(SipRegistration(self.reg, active, prm.code, prm.reason, expires))

    def onIncomingCall(self, prm: Any) -> None:
        self.engine.take_incoming(self, prm.callId)


class _SipCall(pj.Call):  # type: ignore[misc]
    """One call, outgoing or incoming: reports what pjsip sees, keeps its pjsua2 objects alive.

    An outgoing call gets its bridge port at once; an incoming one (``call_id``
    given) when the browser accepts it (:meth:`attach`).
    """

    def __init__(
        self,
        engine: SipEngine,
        account: Any,
        key: int,
        buffers: tuple[FrameBuffer, FrameBuffer] | None = None,
        call_id: int = pj.PJSUA_INVALID_ID,
    ) -> None:
        super().__init__(account, call_id)
        self.engine = engine
        self.key = key
        self.incoming = call_id != pj.PJSUA_INVALID_ID
        self.account = account
        self.port: BridgePort | None = engine.ports.acquire(*buffers) if buffers else None
        #: pjsua2 is done with the call: the object may be deleted (on this thread).
        self.disconnected = False
        #: The INVITE went out. makeCall opens the media transport asynchronously
        #: and sends the INVITE on a later turn; a hangup before that leaks pjsua's
        #: call slot for good (the 5th call then fails with PJ_ETOOMANY).
        self.sent = self.incoming
        #: The status code of a hangup before the answer (incoming calls: 486, 480...).
        self.hangup_code = 0
        self.hangup_pending = False
        self.codec = ""
        #: The call's conference ports connected to the bridge port, by port id.
        self.connected_media: dict[int, Any] = {}
        self.confirmed = False
        #: Active audio that we decode (not on hold, not inactive): watched for RTP.
        self.receiving = False
        self.media_index = -1
        self.rx_packets = -1
        self.rx_since = time.monotonic()
        self.media_timed_out = False
        #: Who holds the call: "local", "remote" or "" (not held).
        self.held = ""
        self.invite: Dialog | None = None
        self.dialog: Dialog | None = None
        #: pjsua's call id, kept at DISCONNECTED: the slot may outlive the call.
        self.slot = -1
        #: An attended transfer asked the far end of another call to replace this one.
        self.replaced = False
        #: The call our own attended transfer asked to be replaced (until it ends).
        self.replacing: _SipCall | None = None

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        state = info.state
        if state == pj.PJSIP_INV_STATE_CALLING:
            self.sent = True
        elif state == pj.PJSIP_INV_STATE_EARLY:
            self.engine.emit(SipProgress(self.key, info.lastStatusCode, info.lastReason))
        elif state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.confirmed = True
            self.rx_since = time.monotonic()
            self.engine.emit(SipAnswered(self.key, self.codec))
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.slot = self.getId()
            self.disconnected = True
            event = prm.e
            failed = (
                event.type == pj.PJSIP_EVENT_TSX_STATE
                and event.body.tsxState.type == pj.PJSIP_EVENT_TRANSPORT_ERROR
            )
            self.engine.emit(
                SipDisconnected(
                    self.key, info.lastStatusCode, info.lastReason, self.replaced, failed
                )
            )

    def onCallTsxState(self, prm: Any) -> None:
        """Keep the dialog's identity, so that the front can end it if this process dies."""
        event = prm.e.body.tsxState
        tsx = event.tsx
        if tsx.method == "INFO" and tsx.role == pj.PJSIP_ROLE_UAS:
            if tsx.state == pj.PJSIP_TSX_STATE_TRYING:
                _refuse_unsupported_info(event.src.rdata)
            return
        if tsx.method != "INVITE" or tsx.role != pj.PJSIP_ROLE_UAC:
            return
        if tsx.state == pj.PJSIP_TSX_STATE_CALLING:  # sent (again, after a challenge)
            self.invite = from_invite(tsx.lastTx.wholeMsg)
        elif event.type == pj.PJSIP_EVENT_RX_MSG and self.invite is not None:
            dialog = with_response(self.invite, event.src.rdata.wholeMsg)
            if dialog is not None and dialog != self.dialog:
                self.dialog = dialog
                self.engine.emit(SipDialog(self.key, dialog))

    def onCallMediaState(self, prm: Any) -> None:
        """Connect the call's audio to the bridge port, on every media change.

        A re-INVITE (hold, resume, a new RTP address, another codec) may give the
        call a new conference port, possibly with the id of the old one, so the
        connections are made again each time: connecting twice is a no-op for
        the conference bridge, skipping a "known" id left the audio silent.
        """
        info = self.getInfo()
        self.receiving = False
        self.connected_media = {}
        for media in info.media:
            if media.type != pj.PJMEDIA_TYPE_AUDIO or self.port is None:
                continue
            if media.status not in _CONNECTED_STATES:
                continue
            audio = self.getAudioMedia(media.index)
            audio.startTransmit(self.port)
            self.port.startTransmit(audio)
            self.connected_media[audio.getPortId()] = audio
            stream = self.getStreamInfo(media.index)
            self.codec = f"{stream.codecName}/{stream.codecClockRate}"
            if media.status == pj.PJSUA_CALL_MEDIA_ACTIVE and media.dir & pj.PJMEDIA_DIR_DECODING:
                self.receiving = True
                self.media_index = media.index
        self._report_hold(info)
        # A media change restarts the inactivity clock (a resumed call gets a
        # whole timeout to start sending again).
        self.rx_packets = -1
        self.rx_since = time.monotonic()

    def _report_hold(self, info: Any) -> None:
        """Tell the call when its audio goes on hold or comes back, and by whom."""
        statuses = [m.status for m in info.media if m.type == pj.PJMEDIA_TYPE_AUDIO]
        if pj.PJSUA_CALL_MEDIA_LOCAL_HOLD in statuses:
            held = "local"
        elif pj.PJSUA_CALL_MEDIA_REMOTE_HOLD in statuses or (
            # a=inactive from the far end: pjsua shows no active media at all
            self.confirmed and statuses and pj.PJSUA_CALL_MEDIA_ACTIVE not in statuses
        ):
            held = "remote"
        else:
            held = ""
        if held == self.held:
            return
        by = held or self.held
        self.held = held
        if self.confirmed:
            self.engine.emit(SipHold(self.key, bool(held), by))

    def onDtmfEvent(self, prm: Any) -> None:
        """Digits from the far end: SIP INFO at once, RFC 4733 events at their end.

        pjsua reports INFO digits here and again (without duration) through
        ``onDtmfDigit``, which is left alone.
        """
        if prm.method == pj.PJSUA_DTMF_METHOD_RFC2833:
            if prm.flags & _DTMF_IS_END:
                self._emit_digit(prm.digit, "rfc4733", prm.duration)
        else:
            self._emit_digit(prm.digit, "info", prm.duration)

    def onCallTransferStatus(self, prm: Any) -> None:
        """A NOTIFY about our REFER: the status of the call the far end placed."""
        final = bool(prm.finalNotify)
        code = int(prm.statusCode)
        if final and self.replacing is not None:
            if not 200 <= code < 300:
                self.replacing.replaced = False  # failed: a later BYE is its own
            self.replacing = None
        self.engine.emit(SipTransfer(self.key, code, str(prm.reason), final))
        prm.cont = not final

    def onCallTransferRequest(self, prm: Any) -> None:
        """The far end sent REFER: decline it here and let the browser decide.

        pjsua would otherwise INVITE the Refer-To URI verbatim, at once, past the
        dialplan and the token's claims (toll fraud); it decides before this
        returns, so the browser's answer cannot be awaited. 603 tells the
        transferor the call stays; the browser may then place the new call.
        """
        prm.statusCode = pj.PJSIP_SC_DECLINE
        self.engine.emit(SipTransferRequest(self.key, str(prm.dstUri)))

    def _emit_digit(self, digit: Any, method: str, duration: int) -> None:
        duration = duration if 0 <= duration < _UNKNOWN_DURATION else 0
        self.engine.emit(SipDtmf(self.key, str(digit)[:1].upper(), method, int(duration)))

    def check_rtp(self, now: float, timeout: float) -> bool:
        """Whether RTP stopped arriving ``timeout`` seconds ago on active, receiving media."""
        if not self.receiving or not self.confirmed or self.disconnected:
            self.rx_since = now
            return False
        try:
            packets = self.getStreamStat(self.media_index).rtcp.rxStat.pkt
        except pj.Error:
            return False
        if packets != self.rx_packets:
            self.rx_packets = packets
            self.rx_since = now
            return False
        return now - self.rx_since >= timeout


#: INFO bodies pjsua understands (DTMF); any other gets 415 instead of pjsua's 500.
_INFO_TYPES = ("application/dtmf-relay", "application/dtmf")


def _refuse_unsupported_info(rdata: Any) -> None:
    """Answer an in-dialog INFO whose body is not DTMF with 415 Unsupported Media Type.

    pjsua answers such an INFO with 500 once the application has not; responding
    here, inside the transaction's TRYING callback, comes first.
    """
    content_type = ""
    for line in str(rdata.wholeMsg).split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() in ("content-type", "c"):
            content_type = value.split(";", 1)[0].strip().lower()
    if content_type in _INFO_TYPES:
        return
    lib = pjsua_library()
    pointer = int(rdata.pjRxData)  # a SWIG void*
    dialog = lib.pjsip_rdata_get_dlg(pointer)
    if dialog:
        lib.pjsip_dlg_respond(dialog, pointer, 415, None, None, None)


class SipEngine:
    """Owns this process's pjsua2 Endpoint and the thread that drives it."""

    def __init__(
        self,
        params: WorkerParams,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[SipEvent], None],
    ) -> None:
        self.params = params
        self._loop = loop
        self._on_event = on_event
        self._commands: queue.Queue[_Command | None] = queue.Queue()
        self._handlers: dict[type[_Command], Callable[[Any], None]] = {
            _MakeCall: self._make_call,
            _Hangup: self._hangup,
            _Hold: self._hold,
            _SendDtmf: self._send_dtmf,
            _Transfer: self._transfer,
            _Register: self._register,
            _Unregister: self._unregister,
            _AnswerIncoming: self._answer_incoming,
        }
        #: Registered users' accounts, by the front's registration number.
        self._accounts: dict[int, _UserAccount] = {}
        #: Incoming calls taken in ``onIncomingCall``, rung (180) on the next turn.
        self._ringing: list[_SipCall] = []
        self._incoming_count = 0
        self._invites = SlidingWindow(INCOMING_PER_SECOND, 1.0)
        self._transport_id = -1
        #: The transport of the PBX's account and the users' (TLS or the UDP one).
        self._pbx_transport_id = -1
        self._sip_port = 0
        #: The SIP/TLS port, with ``sip.transport = "tls"`` (0 otherwise).
        self.tls_port = 0
        self._account: Any = None
        #: Calls to the embedded targets: ``_account`` itself, or with TLS an account
        #: of its own on the UDP transport without SRTP.
        self._local_account: Any = None
        self._guard: RequestGuard | None = None
        self._calls: dict[int, _SipCall] = {}
        #: Ended calls whose pjsua slot is still taken, as (key, pjsua call id).
        self._lingering: list[tuple[int, int]] = []
        self._thread: threading.Thread | None = None
        self._started: asyncio.Future[int] | None = None
        self._ports: PortPool | None = None
        #: pjsua's count of calls holding a slot, as of the owner thread's last turn.
        self.pjsua_calls = 0

    @property
    def ports(self) -> PortPool:
        assert self._ports is not None, "ports exist once the owner thread has started"
        return self._ports

    # --- event-loop side -------------------------------------------------------------

    async def start(self) -> int:
        """Start the owner thread; returns the bound SIP UDP port.

        Raises :class:`SipStartError` when the SIP port cannot be bound.
        """
        self._started = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="pjsua2", daemon=True)
        self._thread.start()
        try:
            return await self._started
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise

    def make_call(
        self,
        key: int,
        uri: str,
        from_sip: FrameBuffer,
        to_sip: FrameBuffer,
        account: int = 0,
        headers: tuple[tuple[str, str], ...] = (),
        local: bool = False,
    ) -> None:
        """Queue an INVITE to ``uri``; its audio goes to ``from_sip``, comes from ``to_sip``.

        ``account``: a registration's account to call from (0: the worker's own).
        ``local``: ``uri`` is an embedded target (the loopback account: UDP, no SRTP).
        """
        self._commands.put(_MakeCall(key, uri, from_sip, to_sip, account, headers, local))

    def hangup(self, key: int, code: int = 0) -> None:
        """Queue a CANCEL or BYE for call ``key`` (no-op when it is already over).

        For an incoming call not yet answered, ``code`` is the final response.
        """
        self._commands.put(_Hangup(key, code))

    def register(self, reg: int, user: str, password: str, auth_user: str, display: str) -> None:
        """Queue the creation of account ``reg`` registering ``user`` to the registrar."""
        self._commands.put(_Register(reg, user, password, auth_user, display))

    def unregister(self, reg: int) -> None:
        self._commands.put(_Unregister(reg))

    def answer_incoming(self, key: int, from_sip: FrameBuffer, to_sip: FrameBuffer) -> None:
        """Queue the 200 OK of incoming call ``key``, its audio bridged to the buffers."""
        self._commands.put(_AnswerIncoming(key, from_sip, to_sip))

    def hold(self, key: int, hold: bool) -> None:
        """Queue a re-INVITE putting call ``key`` on hold (sendonly) or taking it off."""
        self._commands.put(_Hold(key, hold))

    def send_dtmf(self, key: int, digits: str, method: str) -> None:
        """Queue ``digits`` for call ``key`` as RFC 4733 events or SIP INFO (``method``)."""
        self._commands.put(_SendDtmf(key, digits, method))

    def transfer(self, key: int, uri: str, replaces: int = -1) -> None:
        """Queue a REFER for call ``key``: to ``uri`` (blind) or replacing call ``replaces``."""
        self._commands.put(_Transfer(key, uri, replaces))

    async def stop(self) -> None:
        """Hang up every call, destroy the Endpoint and join the thread."""
        if self._thread is None:
            return
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # --- owner-thread side ------------------------------------------------------------

    def emit(self, event: SipEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_event, event)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _run(self) -> None:
        params = self.params
        sip = params.sip
        where = f"sip.bind = {sip.bind!r}, sip.port = {sip.port}"
        if sip.port:
            where += f" (worker {params.index} uses {params.sip_port})"
        try:
            endpoint, transport_id, port = create_endpoint(
                sip.bind, params.sip_port, sip.log_level, params.max_calls, "sipgw", where
            )
            pbx_transport_id = transport_id
            if sip.tls:
                tls_where = f"sip.bind = {sip.bind!r}, sip.tls_port = {sip.tls_port}"
                if sip.tls_port:
                    tls_where += f" (worker {params.index} uses {params.tls_port})"
                pbx_transport_id, self.tls_port = create_tls_transport(
                    endpoint, sip, params.tls_port, tls_where
                )
            trusted = (
                TrustedPeers.parse(params.trusted_peers, sip.untrusted_answer)
                if params.trusted_peers
                else None
            )
            self._guard = RequestGuard(self._policy, trusted)
            set_codecs(endpoint, sip.codecs)
            self._create_account(transport_id, pbx_transport_id, port)
            self._ports = PortPool(params.max_calls)
        except pj.Error as exc:
            self._fail_start(SipStartError(f"SIP stack failed to start: {exc.info()}"))
            return
        except Exception as exc:
            self._fail_start(exc)
            return
        self._loop.call_soon_threadsafe(_resolve, self._started, port)
        try:
            self._serve(endpoint)
        finally:
            self._shutdown(endpoint)

    def _account_config(self, transport_id: int, pbx: bool = True) -> Any:
        """What every account of the worker shares: transport, RTP ports, codecs, timers.

        ``pbx``: the account reaches the PBX, with ``sip.srtp``; the embedded
        targets' account never uses SRTP (loopback, and it has no TLS to carry keys).
        """
        sip, params = self.params.sip, self.params
        config = pj.AccountConfig()
        config.sipConfig.transportId = transport_id
        srtp = sip.srtp if pbx else "off"
        config.mediaConfig.srtpUse = _SRTP_USE[srtp]
        config.mediaConfig.srtpSecureSignaling = _SECURE_HOP if srtp != "off" else 0
        keyings = pj.IntVector()
        if srtp != "off":
            keyings.append(pj.PJMEDIA_SRTP_KEYING_SDES)  # no DTLS-SRTP on the SIP leg
        config.mediaConfig.srtpOpt.keyings = keyings
        config.mediaConfig.transportConfig.port = params.rtp_port
        config.mediaConfig.transportConfig.portRange = params.rtp_port_range
        config.mediaConfig.transportConfig.boundAddress = sip.bind
        # Use the first codec of the answer as it is: no UPDATE/re-INVITE to
        # "lock" it, which some PBXes and SBCs handle badly.
        config.mediaConfig.lockCodecEnabled = False
        # RFC 4028: pjsip refreshes the session, handles 422 (raising Session-Expires
        # to the far end's Min-SE) and ends the call when a refresh goes unanswered.
        config.callConfig.timerUse = _TIMER_USE[sip.session_timers]
        config.callConfig.timerSessExpiresSec = sip.session_expires
        config.callConfig.timerMinSESec = sip.min_se
        return config

    def _create_account(self, transport_id: int, pbx_transport_id: int, port: int) -> None:
        """The worker's SIP identity, held only by the engine (deleted before libDestroy).

        Bound to the TLS transport with ``sip.transport = "tls"``, so that nothing
        it sends can go out over UDP; the embedded targets then get an account of
        their own on the UDP transport.
        """
        self._transport_id, self._sip_port = transport_id, port
        self._pbx_transport_id = pbx_transport_id
        id_uri = f"sip:{self.params.sip.user}@{self.params.sip.bind}:{port}"
        config = self._account_config(pbx_transport_id)
        config.idUri = id_uri
        self._account = _Account()
        self._account.create(config, True)
        self._local_account = self._account
        if pbx_transport_id != transport_id:
            config = self._account_config(transport_id, pbx=False)
            config.idUri = id_uri
            self._local_account = _Account()
            self._local_account.create(config, False)

    def _fail_start(self, exc: BaseException) -> None:
        self._loop.call_soon_threadsafe(_reject, self._started, exc)

    def _serve(self, endpoint: Any) -> None:
        # Reap after every pjsua2 call that may disconnect a call: pjsua reuses a
        # call slot as soon as it is free, and ~Call clears (and hangs up!) the
        # slot it last had, so a stale Call object must be gone before the next
        # makeCall can be given the same slot.
        next_rtp_check = time.monotonic() + RTP_CHECK_INTERVAL
        while True:
            endpoint.libHandleEvents(POLL_MS)
            self._reap()
            self._hang_up_pending()
            self._refuse_unwanted()
            self._ring_incoming()
            now = time.monotonic()
            if now >= next_rtp_check:
                next_rtp_check = now + RTP_CHECK_INTERVAL
                self._check_rtp(now)
            self.pjsua_calls = pjsua_library().pjsua_call_get_count()  # read by the census
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command is None:
                    return
                self._handlers[type(command)](command)
                self._reap()

    # --- registrations and incoming calls -------------------------------------------

    def _policy(self, method: str) -> Answer | None:
        """:func:`worker_policy`, but INVITEs pass while a user is registered here.

        Still refused early (before pjsua opens media sockets) when the worker is
        full or INVITEs come faster than :data:`INCOMING_PER_SECOND`.
        """
        if method != "INVITE" or not self._accounts:
            return worker_policy(method)
        if len(self._calls) >= self.params.max_calls:
            return Answer(486, "Busy Here")
        if not self._invites.add():
            return Answer(503, "Service Unavailable")
        return PASS

    def _register(self, command: _Register) -> None:
        registrar = self.params.registrar
        domain = registrar.realm_domain
        config = self._account_config(self._pbx_transport_id)
        aor = f"sip:{command.user}@{domain}"
        config.idUri = f'"{command.display_name}" <{aor}>' if command.display_name else aor
        registrar_uri = self.params.sip.target_uri(registrar.uri)
        config.regConfig.registrarUri = registrar_uri
        # Everything the user sends goes through the PBX, as from a desk phone.
        config.sipConfig.proxies.append(registrar_uri + ";lr")
        config.regConfig.timeoutSec = registrar.expires
        # A failed registration is the browser's to retry (a wrong password must
        # not be tried again and again).
        config.regConfig.retryIntervalSec = 0
        config.regConfig.dropCallsOnFail = False
        # Only the registrar's realm: with "*" pjsip would answer anyone's 401/407
        # (a far end challenging our BYE) with a digest of the user's password.
        credentials = pj.AuthCredInfo(
            "digest", registrar.digest_realm, command.auth_user or command.user, 0, command.password
        )
        config.sipConfig.authCreds.append(credentials)
        account = _UserAccount(self, command.reg)
        try:
            account.create(config, False)
        except pj.Error as exc:
            self.emit(SipRegistration(command.reg, False, 500, f"cannot register: {exc.reason}"))
            return
        self._accounts[command.reg] = account

    def _unregister(self, command: _Unregister) -> None:
        account = self._accounts.pop(command.reg, None)
        if account is None:
            return
        for call in self._calls.values():
            if call.account is account:
                call.hangup_code = 480
                self._send_hangup(call)
        try:
            account.shutdown()  # sends REGISTER with Expires: 0 when registered
        except pj.Error as exc:
            logger.debug("unregistering account %s: %s", command.reg, exc.info())

    def take_incoming(self, account: _UserAccount, call_id: int) -> None:
        """``onIncomingCall``: keep the call (rung on the next turn, never from here)."""
        self._incoming_count += 1
        # Negative keys, distinct per worker: the front numbers outgoing calls from 1.
        key = -(self._incoming_count * 1024 + self.params.index + 1)
        call = _SipCall(self, account, key, call_id=call_id)
        call.account = account
        self._calls[key] = call
        self._ringing.append(call)

    def _ring_incoming(self) -> None:
        while self._ringing:
            call = self._ringing.pop(0)
            if call.disconnected:
                continue
            op = pj.CallOpParam(True)
            op.statusCode = 180
            try:
                call.answer(op)
                info = call.getInfo()
            except pj.Error as exc:
                logger.debug("ringing incoming call %s: %s", call.key, exc.info())
                continue
            display, from_uri = split_name_addr(info.remoteUri)
            _, to_uri = split_name_addr(info.localUri)
            self.emit(SipIncoming(call.key, call.account.reg, from_uri, display, to_uri))

    def _answer_incoming(self, command: _AnswerIncoming) -> None:
        call = self._calls.get(command.key)
        if call is None or call.disconnected:
            return
        call.port = self.ports.acquire(command.from_sip, command.to_sip)
        op = pj.CallOpParam(True)
        op.statusCode = 200
        try:
            call.answer(op)
        except pj.Error as exc:
            logger.info("answering incoming call %s failed: %s", call.key, exc.info())
            self._send_hangup(call)

    def _check_rtp(self, now: float) -> None:
        """Report calls whose far end stopped sending RTP (``calls.media_timeout``)."""
        timeout = self.params.calls.media_timeout
        if not timeout:
            return
        for call in self._calls.values():
            if not call.media_timed_out and call.check_rtp(now, timeout):
                call.media_timed_out = True
                self.emit(SipMediaTimeout(call.key, timeout))

    def _make_call(self, command: _MakeCall) -> None:
        if command.local:
            account = self._local_account
        else:
            account = self._accounts.get(command.account, self._account)
        call = _SipCall(self, account, command.key, (command.from_sip, command.to_sip))
        self._calls[command.key] = call
        if call.port is None:  # cannot happen while calls <= max_calls; be safe
            call.disconnected = True
            self.emit(SipFailed(call.key, place_failed(0, "no free media port")))
            return
        op = pj.CallOpParam(True)
        for name, value in command.headers:
            header = pj.SipHeader()
            header.hName = name
            header.hValue = value
            op.txOption.headers.append(header)
        try:
            call.makeCall(command.uri, op)
        except pj.Error as exc:
            call.disconnected = True
            self.emit(SipFailed(call.key, place_failed(exc.status, exc.reason)))

    def _hangup(self, command: _Hangup) -> None:
        call = self._calls.get(command.key)
        if call is None:
            return
        call.hangup_code = command.code
        if call.sent:
            self._send_hangup(call)
        else:
            call.hangup_pending = True  # sent by _hang_up_pending once the INVITE is out

    def _hold(self, command: _Hold) -> None:
        call = self._calls.get(command.key)
        action = "hold" if command.hold else "unhold"
        if call is None or call.disconnected or not call.confirmed:
            self.emit(SipControlFailed(command.key, action, "the call is not connected"))
            return
        op = pj.CallOpParam(True)
        try:
            if command.hold:
                call.setHold(op)
            else:
                op.opt.flag = pj.PJSUA_CALL_UNHOLD
                call.reinvite(op)
        except pj.Error as exc:
            self.emit(SipControlFailed(command.key, action, f"{action} failed: {exc.reason}"))

    def _send_dtmf(self, command: _SendDtmf) -> None:
        call = self._calls.get(command.key)
        if call is None or call.disconnected or not call.confirmed:
            self.emit(SipControlFailed(command.key, "dtmf", "the call is not connected"))
            return
        param = pj.CallSendDtmfParam()
        # "auto" (digits the browser sent in its RTP): RFC 4733 if negotiated, else INFO.
        method = "rfc4733" if command.method == "auto" else command.method
        param.method = _DTMF_METHODS[method]
        param.digits = command.digits
        param.duration = DTMF_DURATION_MS
        try:
            try:
                call.sendDtmf(param)
            except pj.Error:
                if command.method != "auto":
                    raise
                param.method = _DTMF_METHODS["info"]
                call.sendDtmf(param)
        except pj.Error as exc:
            if command.method == "rfc4733":
                message = (
                    "the SIP side did not negotiate telephone-event (RFC 4733); try method 'info'"
                )
            else:
                message = f"DTMF could not be sent: {exc.reason}"
            self.emit(SipControlFailed(command.key, "dtmf", message))

    def _transfer(self, command: _Transfer) -> None:
        call = self._calls.get(command.key)
        if call is None or call.disconnected or not call.confirmed:
            self.emit(SipControlFailed(command.key, "transfer", "the call is not connected"))
            return
        op = pj.CallOpParam(True)
        try:
            if command.replaces < 0:
                call.xfer(command.uri, op)
            else:
                other = self._calls.get(command.replaces)
                if other is None or other.disconnected or not other.confirmed:
                    self.emit(
                        SipControlFailed(
                            command.key, "transfer", "the call to replace is not connected"
                        )
                    )
                    return
                call.xferReplaces(other, op)
                other.replaced = True
                call.replacing = other
        except pj.Error as exc:
            self.emit(SipControlFailed(command.key, "transfer", f"REFER failed: {exc.reason}"))

    def _hang_up_pending(self) -> None:
        for call in self._calls.values():
            if call.hangup_pending and call.sent:
                call.hangup_pending = False
                self._send_hangup(call)

    def _send_hangup(self, call: _SipCall) -> None:
        if call.disconnected:
            return
        op = pj.CallOpParam(True)
        if call.incoming and not call.confirmed and call.hangup_code:
            op.statusCode = call.hangup_code
        try:
            call.hangup(op)
        except pj.Error as exc:
            logger.debug("hangup of call %s: %s", call.key, exc.info())

    def _reap(self) -> None:
        """Delete pjsua2 objects of finished calls (never from inside their callbacks).

        The call's slot is reported free only once pjsua frees it: a call hung up
        before any response is DISCONNECTED at once, but pjsua keeps its slot until
        the INVITE transaction ends (Timer B, 32 s). Reporting it free earlier let
        the front place a call that then failed with PJ_ETOOMANY.
        """
        done = [key for key, call in self._calls.items() if call.disconnected]
        for key in done:
            call = self._calls.pop(key)
            self._release_media(call)
            self._lingering.append((key, call.slot))
            del call
        if self._lingering:
            taken = self._taken_slots()
            for key, slot in [entry for entry in self._lingering if entry[1] not in taken]:
                self._lingering.remove((key, slot))
                self.emit(SipReleased(key))

    def _taken_slots(self) -> set[int]:
        """The call ids pjsua still holds (``pjsua_enum_calls``)."""
        ids = (ctypes.c_int * self.params.max_calls)()
        count = ctypes.c_uint(self.params.max_calls)
        if pjsua_library().pjsua_enum_calls(ids, ctypes.byref(count)) != 0:
            return set()
        return set(ids[: count.value])

    def _refuse_unwanted(self) -> None:
        self._refuse_unwanted_of(self._account)
        if self._local_account is not self._account:
            self._refuse_unwanted_of(self._local_account)

    def _refuse_unwanted_of(self, account: _Account) -> None:
        unwanted = account.unwanted
        if not unwanted:
            return
        for call in unwanted:
            if not call.refused:
                call.refused = True
                op = pj.CallOpParam()
                op.statusCode = REFUSE_INVITE.code
                op.reason = REFUSE_INVITE.reason
                try:
                    call.hangup(op)
                except pj.Error as exc:
                    logger.debug("refusing an incoming call: %s", exc.info())
        # Delete only once pjsip is done: a Call deleted later acts on a reused id.
        unwanted[:] = [call for call in unwanted if not call.disconnected]

    def _release_media(self, call: _SipCall) -> None:
        """Disconnect the call's port and give it back to the pool (never destroyed)."""
        port = call.port
        if port is None:
            return
        # A DISCONNECTED call's conference port is gone, and its connections with it:
        # disconnecting again only makes pjsua log PJ_EINVAL.
        for audio in call.connected_media.values() if not call.disconnected else ():
            try:
                audio.stopTransmit(port)
                port.stopTransmit(audio)
            except pj.Error:
                pass
        call.connected_media.clear()
        call.port = None
        self.ports.release(port)

    def _shutdown(self, endpoint: Any) -> None:
        """Hang up, then free every pjsua2 object while the library still lives.

        Each step is a method of its own so that no local variable keeps a
        Call alive past ``libDestroy`` (its destructor would then assert).
        """
        self._hang_up_all()
        deadline = time.monotonic() + 2.0
        while self._calls and time.monotonic() < deadline:
            endpoint.libHandleEvents(POLL_MS)
            self._reap()
        self._drop_calls()
        # Let the conference bridge apply the queued disconnects before the
        # ports go (they are no longer transmitting, so the clock leaves them be).
        for _ in range(5):
            endpoint.libHandleEvents(POLL_MS)
        if self._ports is not None:
            self._ports.close()
            self._ports = None
        for _ in range(5):
            endpoint.libHandleEvents(POLL_MS)
        self._drop_account()
        endpoint.libDestroy()

    def _hang_up_all(self) -> None:
        for call in self._calls.values():
            self._send_hangup(call)

    def _drop_calls(self) -> None:
        """Delete the Call objects pjsua2 did not finish in time (hanging them up)."""
        for key in list(self._calls):
            self._release_media(self._calls[key])
            del self._calls[key]
            self.emit(SipReleased(key))
        for key, _ in self._lingering:
            self.emit(SipReleased(key))
        self._lingering.clear()

    def _drop_account(self) -> None:
        for account in self._accounts.values():
            try:
                account.shutdown()
            except pj.Error:
                pass
        self._accounts.clear()
        for own in {id(a): a for a in (self._local_account, self._account) if a}.values():
            own.unwanted.clear()
            try:
                own.shutdown()
            except pj.Error:
                pass
        self._account = self._local_account = None


def split_name_addr(value: str) -> tuple[str, str]:
    """``'"Alice" <sip:1002@pbx>;tag=x'`` -> ``("Alice", "sip:1002@pbx")``."""
    value = value.strip()
    if "<" in value and ">" in value:
        name = value.split("<", 1)[0].strip().strip('"').strip()
        return name, value.split("<", 1)[1].split(">", 1)[0]
    return "", value.split(";", 1)[0]


def _resolve(future: asyncio.Future[int] | None, value: int) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[int] | None, exc: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(exc)
