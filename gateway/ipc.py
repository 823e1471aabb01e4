"""What crosses between the front process and a worker: the only module both import.

Only signaling crosses the process boundary, as frozen dataclasses pickled
over a stream socket; audio stays inside the worker. A call is named by
``key``, an integer the front assigns and never reuses. Both ends read and
write the socket on their event loop through a :class:`Channel`: no reader
thread, and a send never blocks (the transport buffers it).

A child process is started by module path (:class:`Entry`), so the front never
imports the worker's code, nor pjsua2, aiortc or PyAV with it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pickle
import socket
import struct
from dataclasses import dataclass, field, replace
from typing import Any, Self

from gateway.config import CallsConfig, EmbeddedConfig, IceServer, RegistrarConfig, SipConfig
from gateway.outcomes import Ending, Refusal

logger = logging.getLogger(__name__)

# --- how a worker is started ---------------------------------------------------------


@dataclass(frozen=True)
class WorkerParams:
    """Everything a worker needs, picklable for the ``spawn`` start method."""

    index: int
    sip: SipConfig
    #: This worker's SIP UDP port (``sip.port + index``, or 0 for any free port).
    sip_port: int
    #: This worker's block of RTP ports: ``rtp_port`` to ``rtp_port + rtp_port_range - 1``.
    rtp_port: int
    rtp_port_range: int
    max_calls: int
    calls: CallsConfig = field(default_factory=CallsConfig)
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    ice_servers: tuple[IceServer, ...] = ()
    ice_addresses: tuple[str, ...] = ()
    consent_timeout: float = 30.0
    log_level: int = logging.INFO
    #: Networks whose new SIP requests the worker answers (empty: any source): ``sip.
    #: trusted_peers``, or the configured targets' addresses (gateway.front.sip_peers).
    trusted_peers: tuple[str, ...] = ()
    #: This worker's SIP/TLS port with ``sip.transport = "tls"`` (``sip.tls_port +
    #: index``, or 0 for any free port).
    tls_port: int = 0

    def with_sip_port(self, port: int) -> Self:
        return replace(self, sip_port=port)


@dataclass(frozen=True)
class TargetsParams:
    """What one embedded targets process needs."""

    index: int
    embedded: EmbeddedConfig
    #: This process's SIP UDP port (``embedded.port + index``, or 0 for any free port).
    sip_port: int
    #: This process's block of 100 RTP ports, from ``embedded.rtp_port + 100 * index``.
    rtp_port: int
    #: Calls it answers at once (pjsua's limit).
    max_calls: int
    #: pjsip log level, as ``sip.log_level``.
    sip_log_level: int
    log_level: int = logging.INFO

    def with_sip_port(self, port: int) -> Self:
        return replace(self, sip_port=port)


@dataclass(frozen=True)
class Entry:
    """A process entry point named by module path: the front never imports its module."""

    module: str
    function: str = "run"

    def __call__(self, *args: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.function)(*args)


# --- front -> worker -----------------------------------------------------------------


@dataclass(frozen=True)
class StartCall:
    """Answer ``offer_sdp`` and place a SIP call to ``uri``."""

    key: int
    offer_sdp: str
    uri: str
    #: Place it from this registration's account (From, digest, outbound proxy);
    #: 0: the worker's own identity.
    account: int = 0
    #: Seconds the answered call may last (the token's ``max_duration``); 0: the
    #: worker's ``calls.max_duration`` alone. The smaller of the two applies.
    max_duration: float = 0.0
    #: Extra headers for the INVITE: the dialplan rule's, then the browser's allowed ones.
    headers: tuple[tuple[str, str], ...] = ()
    #: ``uri`` is an embedded target: dialled on loopback UDP without SRTP, whatever
    #: ``sip.transport`` and ``sip.srtp`` say.
    local: bool = False


@dataclass(frozen=True)
class EndCall:
    """Hang up call ``key`` (CANCEL or BYE); ``ending`` overrides the browser's own result."""

    key: int
    ending: Ending | None = None


@dataclass(frozen=True)
class ControlCall:
    """An in-call request of the browser: ``hold``, ``unhold``, ``dtmf`` or ``transfer``.

    A transfer goes to ``uri`` (blind, routed by the front's dialplan) or
    replaces the same worker's call ``replaces`` (attended). ``request_id``
    comes back in the event or error it leads to.
    """

    key: int
    action: str
    digits: str = ""
    method: str = ""
    request_id: str | None = None
    uri: str = ""
    replaces: int = -1


@dataclass(frozen=True)
class AddCandidate:
    """A trickled ICE candidate of the browser for call ``key``; ``None``: end of candidates.

    ``candidate`` is the ``candidate:...`` attribute value (without ``a=``).
    """

    key: int
    candidate: str | None
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Register:
    """Register ``user`` to the configured registrar as account ``reg``.

    The password crosses to the worker and never comes back.
    """

    reg: int
    user: str
    password: str = field(repr=False)
    auth_user: str = ""
    display_name: str = ""


@dataclass(frozen=True)
class Unregister:
    """Unregister account ``reg`` and forget it."""

    reg: int


@dataclass(frozen=True)
class AcceptCall:
    """The browser accepted incoming call ``key`` with ``answer_sdp``."""

    key: int
    answer_sdp: str


@dataclass(frozen=True)
class RejectCall:
    """The browser refused incoming call ``key`` with SIP ``code`` (486, 603...)."""

    key: int
    code: int


@dataclass(frozen=True)
class Shutdown:
    """Hang up every call and exit."""


@dataclass(frozen=True)
class Census:
    """Report what this process holds (:mod:`gateway.census`); ``seq`` names the reply."""

    seq: int


# --- worker -> front -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    """Sent once the SIP stack listens (by workers and the embedded targets alike)."""

    sip_port: int


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start; ``message`` names the config key and the OS error."""

    message: str


@dataclass(frozen=True)
class CallAnswer:
    """The SDP answer for the browser; the INVITE is being sent."""

    key: int
    sdp: str


@dataclass(frozen=True)
class CallRefused:
    """The call could not start (bad offer...)."""

    key: int
    refusal: Refusal
    message: str


@dataclass(frozen=True)
class CallProgress:
    key: int
    code: int
    reason: str


@dataclass(frozen=True)
class CallAccepted:
    key: int
    webrtc_codec: str
    sip_codec: str


@dataclass(frozen=True)
class CallEnded:
    key: int
    ending: Ending
    #: Frame counters of the media bridge: uplink/downlink pushed, missing, dropped.
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Dialog:
    """What it takes to end a call's SIP leg without its worker (which may be dead).

    Taken from the INVITE the worker sent and the response that formed the
    dialog (an 18x with a To tag, or the 2xx). Header values are as on the wire.
    """

    call_id: str
    #: Our From header value (with our tag) and the INVITE's To value (no tag).
    local: str
    invite_to: str
    #: The INVITE's Request-URI, top Via, CSeq number and Route values (for CANCEL).
    request_uri: str
    invite_via: str
    cseq: int
    invite_routes: tuple[str, ...]
    #: The far end's To value (with its tag), its Contact URI, the route set.
    remote: str = ""
    remote_target: str = ""
    route_set: tuple[str, ...] = ()
    #: A 2xx formed the dialog (BYE ends it); else it is early (CANCEL ends it).
    confirmed: bool = False


@dataclass(frozen=True)
class CallDialog:
    """Call ``key``'s SIP dialog, sent when it forms and when it is confirmed."""

    key: int
    dialog: Dialog


@dataclass(frozen=True)
class CallHold:
    """Call ``key`` went on hold (``held``) or came back; ``by`` is local or remote."""

    key: int
    held: bool
    by: str
    request_id: str | None = None


@dataclass(frozen=True)
class CallDtmf:
    """A DTMF digit from the SIP side (``method`` ``rfc4733`` or ``info``, duration in ms)."""

    key: int
    digit: str
    method: str
    duration: int


@dataclass(frozen=True)
class CallTransfer:
    """Progress of call ``key``'s transfer: the far end's NOTIFY (``final`` ends it)."""

    key: int
    code: int
    reason: str
    final: bool
    request_id: str | None = None


@dataclass(frozen=True)
class CallTransferRequest:
    """The far end asked (REFER) that call ``key`` be transferred to ``target``.

    The worker declined the REFER itself; the browser may place the new call.
    """

    key: int
    target: str


@dataclass(frozen=True)
class CallControlFailed:
    """A :class:`ControlCall` could not be carried out: an ``error`` for the browser."""

    key: int
    error: str
    message: str
    request_id: str | None = None


@dataclass(frozen=True)
class RegistrationChanged:
    """Account ``reg``'s registration: ``active`` with ``expires``, or lost/failed (``code``)."""

    reg: int
    active: bool
    code: int
    reason: str
    expires: int = 0


@dataclass(frozen=True)
class CallIncoming:
    """An INVITE for account ``reg``: call ``key`` rings, ``offer_sdp`` is for the browser."""

    key: int
    reg: int
    from_uri: str
    display_name: str
    to_uri: str
    offer_sdp: str


@dataclass(frozen=True)
class CallReleased:
    """Every resource of call ``key`` is freed; its worker slot may be reused."""

    key: int


@dataclass(frozen=True)
class CensusReport:
    """The answer to :class:`Census` ``seq``: counts by name (workers and targets alike)."""

    seq: int
    counts: dict[str, Any]


ToWorker = (
    StartCall
    | EndCall
    | ControlCall
    | AddCandidate
    | Register
    | Unregister
    | AcceptCall
    | RejectCall
    | Shutdown
    | Census
)
ToTargets = Shutdown | Census
FromWorker = (
    WorkerReady
    | WorkerFailed
    | CallAnswer
    | CallRefused
    | CallProgress
    | CallAccepted
    | CallEnded
    | CallDialog
    | CallHold
    | CallDtmf
    | CallTransfer
    | CallTransferRequest
    | CallControlFailed
    | RegistrationChanged
    | CallIncoming
    | CallReleased
    | CensusReport
)

# --- the channel -----------------------------------------------------------------------

_HEADER = struct.Struct("!I")
#: Largest message accepted: an SDP is at most 32 KiB, so this is generous.
MAX_MESSAGE = 1 << 20


def send_blocking(sock: socket.socket, message: object) -> None:
    """Write one message the way :class:`Channel` frames it, for a process with no loop."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_blocking(sock: socket.socket) -> Any:
    """Read one message framed by :class:`Channel`, or ``None`` at end of file."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _recv_exactly(sock, size) if size <= MAX_MESSAGE else None
    return pickle.loads(data) if data is not None else None


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class Channel:
    """Length-prefixed pickles over a connected stream socket, on the event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: object) -> bool:
        """Queue ``message``; ``False`` when the other end is gone. Never blocks."""
        if self._writer.is_closing():
            return False
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(data)) + data)
        return True

    async def recv(self) -> Any:
        """The next message, or ``None`` once the other end has closed."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > MAX_MESSAGE:
                logger.error("IPC message of %d bytes refused; closing the channel", size)
                return None
            return pickle.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def drain(self) -> None:
        """Wait until queued messages are handed to the kernel (or the peer is gone)."""
        try:
            await self._writer.drain()
        except ConnectionError:
            pass

    def close(self) -> None:
        self._writer.close()
