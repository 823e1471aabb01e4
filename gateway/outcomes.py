"""Every way a call ends or is refused, in one table.

A call that started (its worker answered the offer) ends with exactly one
:class:`Ending`: the ``hangup`` event's ``code``/``reason``/``by`` and the
metrics label all come from :class:`End`. A call that never started is refused
with one :class:`Refusal`: the ``error`` message's code and the metrics label.
Pure data and functions, imported by both processes; ``docs/protocol.md``
documents the same tables (a test holds them together).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

#: Who ended a call: the browser side, the SIP side, or the gateway itself.
EndedBy = Literal["local", "remote", "gateway"]


@dataclass(frozen=True, eq=False)  # identity: equal rows must stay distinct members
class EndRow:
    """One row of the endings table. ``code == 0``: taken from the SIP response."""

    code: int
    reason: str
    by: EndedBy


class End(Enum):
    """How a started call ends. The member name, lower-cased, is the metrics label."""

    #: The browser hung up before the answer: CANCEL sent (or no INVITE yet).
    LOCAL_CANCEL = EndRow(487, "Request Terminated", "local")
    #: The browser hung up an answered call: BYE sent.
    LOCAL_BYE = EndRow(200, "Normal call clearing", "local")
    #: The browser's WebSocket closed (or missed its heartbeat): CANCEL or BYE sent.
    WEBSOCKET_CLOSED = EndRow(200, "WebSocket connection closed", "local")
    #: Incoming call: the caller hung up (CANCEL) before the browser answered.
    REMOTE_CANCEL = EndRow(487, "Caller hung up before the answer", "remote")
    #: Incoming call: the browser refused it with ``reject`` (its code sent to the caller).
    LOCAL_REJECT = EndRow(0, "Rejected", "local")
    #: Incoming call: another tab of the same user accepted it first.
    ANSWERED_ELSEWHERE = EndRow(200, "Call answered elsewhere", "local")
    #: Incoming call: the browser's ``accept`` carried an SDP answer that cannot be used.
    BAD_ANSWER = EndRow(488, "Not Acceptable Here: the browser's answer cannot be used", "gateway")
    #: The call was handed on with ``transfer``: the far end reported the
    #: transfer's success (NOTIFY 2xx), or, attended, replaced this call.
    TRANSFERRED = EndRow(200, "Call transferred", "local")
    #: The SIP side sent BYE after the answer.
    REMOTE_BYE = EndRow(200, "Remote hangup (BYE)", "remote")
    #: The SIP side answered the INVITE with a final error (404, 486, 603...).
    REMOTE_REJECT = EndRow(0, "", "remote")
    #: No 18x or 2xx within ``sip.invite_timeout``: CANCEL sent.
    INVITE_TIMEOUT = EndRow(408, "Request Timeout (no answer from the SIP target)", "gateway")
    #: The browser's ICE and DTLS did not connect within ``calls.setup_timeout``
    #: (or failed before that).
    ICE_FAILED = EndRow(480, "ICE connection failed", "gateway")
    #: The browser's WebRTC connection was lost after set-up (ICE consent
    #: expired, DTLS closed, connection failed): BYE or CANCEL sent.
    WEBRTC_LOST = EndRow(480, "WebRTC connection lost", "gateway")
    #: No audio from one leg for ``calls.media_timeout`` (not counting hold).
    MEDIA_TIMEOUT = EndRow(408, "Media timeout", "gateway")
    #: The call rang for ``calls.max_ringing`` (an incoming one for
    #: ``registrar.ring_timeout``): CANCEL, or 480 to the caller.
    NO_ANSWER = EndRow(480, "No answer", "gateway")
    #: The answered call reached ``calls.max_duration``: BYE sent.
    MAX_DURATION = EndRow(200, "Maximum call duration reached", "gateway")
    #: The SIP target's host said its port is closed (ICMP port unreachable).
    TARGET_UNREACHABLE = EndRow(503, "SIP target unreachable", "gateway")
    #: ``sip.transport = "tls"``: no TLS connection to the target carried the INVITE
    #: (its certificate failed verification, the connection was refused...).
    TLS_FAILED = EndRow(503, "TLS connection to the SIP target failed", "gateway")
    #: The RFC 4028 session was not refreshed in time: BYE sent.
    SESSION_EXPIRED = EndRow(408, "Session timer expired", "gateway")
    #: The worker process carrying the call died.
    WORKER_DIED = EndRow(500, "Gateway worker stopped unexpectedly", "gateway")
    #: The embedded targets process answering the call died.
    TARGET_DIED = EndRow(500, "Embedded SIP target stopped unexpectedly", "gateway")
    #: The SIP call ended with no status code at all (transport failure).
    TRANSPORT_ERROR = EndRow(500, "SIP transport error", "gateway")
    #: The SIP stack refused to start the INVITE: too many calls.
    PLACE_TOO_MANY = EndRow(503, "Call could not be placed", "gateway")
    #: The SIP stack refused the target URI.
    PLACE_BAD_URI = EndRow(400, "Call could not be placed", "gateway")
    #: Any other failure to start the INVITE.
    PLACE_FAILED = EndRow(500, "Call could not be placed", "gateway")
    #: The gateway is stopping.
    SHUTDOWN = EndRow(503, "Gateway shutting down", "gateway")

    @property
    def label(self) -> str:
        return self.name.lower()

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return getattr, (End, self.name)  # by name: rows compare by identity


@dataclass(frozen=True)
class Ending:
    """The end of one call as the browser hears it (crosses the worker pipe)."""

    kind: End
    code: int
    reason: str

    @property
    def by(self) -> EndedBy:
        return self.kind.value.by

    @property
    def label(self) -> str:
        return self.kind.label


def ending(kind: End, code: int = 0, reason: str = "") -> Ending:
    """The table's code and reason for ``kind``; ``code``/``reason`` fill what it leaves open."""
    row = kind.value
    return Ending(kind, row.code or code, reason or row.reason)


#: Final codes of an in-dialog request (RFC 5057) on which pjsip ends an answered call.
SESSION_LOST_CODES = (408, 481)


def sip_disconnected(code: int, reason: str, *, answered: bool, tls_failed: bool = False) -> Ending:
    """The ending of a SIP leg that the far end (or the network) ended.

    ``tls_failed``: pjsip's TLS transport, not the far end, failed the INVITE
    (pjsip then makes up a 503 with its own error text as the reason).
    """
    if tls_failed and not answered:
        return ending(End.TLS_FAILED, reason=f"{End.TLS_FAILED.value.reason}: {reason}")
    if code == 0:
        return ending(End.TRANSPORT_ERROR, reason=reason)
    if answered and code in SESSION_LOST_CODES:
        # pjsip itself sent BYE (Reason: SIP;cause=408): the session refresh went
        # unanswered (408) or the far end no longer knew the dialog (481), or the
        # far end stopped refreshing and the session expired.
        return ending(End.SESSION_EXPIRED, reason=f"Session timer expired ({code} {reason})")
    if answered or code == 200:
        return ending(End.REMOTE_BYE)
    return ending(End.REMOTE_REJECT, code, reason or f"SIP {code}")


def local_hangup(*, answered: bool) -> Ending:
    """The browser's ``hangup``: BYE once answered, CANCEL before."""
    return ending(End.LOCAL_BYE if answered else End.LOCAL_CANCEL)


#: pj_status_t values of ``makeCall`` failures that are not plain 500s (pj_errno.h, sip_errno.h).
PJ_ETOOMANY = 70010
PJSIP_URI_ERRORS = range(171039, 171044)  # EINVALIDURI .. EURITOOLONG


def place_failed(status: int, detail: str) -> Ending:
    """The ending of a call whose INVITE the SIP stack refused to start (``pj.Error``)."""
    if status == PJ_ETOOMANY:
        kind = End.PLACE_TOO_MANY
    elif status in PJSIP_URI_ERRORS:
        kind = End.PLACE_BAD_URI
    else:
        kind = End.PLACE_FAILED
    return ending(kind, reason=f"{kind.value.reason}: {detail}")


@dataclass(frozen=True, eq=False)
class RefusalRow:
    """One row of the refusals table: the protocol ``error`` code sent."""

    error: str


class Refusal(Enum):
    """Why a call never started. The member name, lower-cased, is the metrics label."""

    #: ``to`` is not a valid number (empty, too long, bad character).
    BAD_NUMBER = RefusalRow("bad_request")
    #: A header of the ``call`` is not on ``sip.allowed_headers`` (or the rule sets it).
    BAD_HEADER = RefusalRow("bad_request")
    #: No dialplan rule matches ``to`` (default deny): no INVITE sent.
    NO_ROUTE = RefusalRow("forbidden")
    #: A dialplan ``reject`` rule matched: no INVITE sent.
    DIALPLAN_REJECT = RefusalRow("forbidden")
    #: The call id was used before on this connection.
    DUPLICATE_ID = RefusalRow("wrong_state")
    #: The connection has ``http.max_calls_per_connection`` live calls.
    CONNECTION_LIMIT = RefusalRow("busy")
    #: Every ready worker is at its call limit.
    NO_CAPACITY = RefusalRow("busy")
    #: Every worker with a free slot started ``workers.max_setups_per_second`` calls
    #: in the last second.
    SETUP_RATE = RefusalRow("busy")
    #: The connection made ``http.max_call_rate`` call requests in the last second.
    CONNECTION_RATE = RefusalRow("busy")
    #: No worker is ready at all (all starting or restarting).
    NO_WORKER = RefusalRow("unavailable")
    #: The worker chosen for the call could not be reached.
    WORKER_UNREACHABLE = RefusalRow("unavailable")
    #: The gateway is shutting down.
    SHUTTING_DOWN = RefusalRow("unavailable")
    #: The browser's SDP offer cannot be answered.
    BAD_OFFER = RefusalRow("bad_request")
    #: Answering the offer failed unexpectedly.
    ANSWER_FAILED = RefusalRow("internal")
    #: The connection's token has expired since it was checked.
    TOKEN_EXPIRED = RefusalRow("unauthorized")
    #: The route's dialplan rule is not in the token's ``dial`` claim: no INVITE sent.
    TOKEN_DIAL = RefusalRow("forbidden")
    #: The connection has the token's ``max_calls`` live calls.
    TOKEN_CALL_LIMIT = RefusalRow("busy")
    #: The token's user has ``http.max_calls_per_user`` live calls (all connections).
    USER_CALL_LIMIT = RefusalRow("busy")
    #: The source address has ``http.max_calls_per_ip`` live calls (all connections).
    ADDRESS_CALL_LIMIT = RefusalRow("busy")
    #: The gateway carries ``http.max_calls_total`` calls.
    GATEWAY_CALL_LIMIT = RefusalRow("busy")
    #: The token's user started ``http.calls_per_minute_per_user`` calls in the last minute.
    USER_CALL_RATE = RefusalRow("rate_limited")
    #: The source address started ``http.calls_per_minute_per_ip`` calls in the last minute.
    ADDRESS_CALL_RATE = RefusalRow("rate_limited")

    @property
    def error(self) -> str:
        return self.value.error

    @property
    def label(self) -> str:
        return self.name.lower()

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return getattr, (Refusal, self.name)


class Refused(Exception):
    """A call that will not start; the session turns it into an ``error`` message."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message
