"""Messages between the front process and a worker process.

Only signaling crosses the process boundary, as these frozen dataclasses
(pickled over a ``multiprocessing`` pipe); audio stays inside the worker.
A call is named by ``key``, an integer the front assigns and never reuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.sip.events import EndedBy

# --- front -> worker ---------------------------------------------------------------


@dataclass(frozen=True)
class StartCall:
    """Answer ``offer_sdp`` and place a SIP call to ``uri``."""

    key: int
    offer_sdp: str
    uri: str


@dataclass(frozen=True)
class EndCall:
    """Hang up call ``key`` (CANCEL or BYE) at the browser's request."""

    key: int
    code: int = 0
    reason: str = ""
    by: EndedBy = "local"


@dataclass(frozen=True)
class Shutdown:
    """Hang up every call and exit."""


# --- worker -> front ---------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    sip_port: int


@dataclass(frozen=True)
class CallAnswer:
    """The SDP answer for the browser; the INVITE is being sent."""

    key: int
    sdp: str


@dataclass(frozen=True)
class CallRefused:
    """The call could not start (bad offer...); ``error`` is a protocol error code."""

    key: int
    error: str
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
    code: int
    reason: str
    by: EndedBy
    #: Frame counters of the media bridge: uplink/downlink pushed, missing, dropped.
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CallReleased:
    """Every resource of call ``key`` is freed; its worker slot may be reused."""

    key: int


ToWorker = StartCall | EndCall | Shutdown
FromWorker = (
    WorkerReady | CallAnswer | CallRefused | CallProgress | CallAccepted | CallEnded | CallReleased
)
