"""The browser protocol's wire schema (v1): parse and serialize, no I/O.

Each message is a JSON object with a ``type``. Client requests may carry an
``id`` (string) that the reply or error echoes. :func:`parse` turns a text
frame into one of the request dataclasses or raises :class:`ProtocolError`
naming the problem; :func:`encode` turns a gateway message into JSON, leaving
out fields that are ``None``. ``docs/protocol.md`` documents every message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dialplan.headers import MAX_HEADERS, header_problem

PROTOCOL_VERSION = 1

#: Error codes sent in ``error`` messages.
ERROR_CODES = (
    "bad_request",
    "forbidden",
    "not_found",
    "wrong_state",
    "busy",
    "unavailable",
    "internal",
    "unauthorized",
    "rate_limited",
)

_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
MAX_SDP_BYTES = 32 * 1024
#: Integers with more digits than this are refused (a 64-bit value has at most 20).
MAX_INT_DIGITS = 20
#: Objects and arrays nested deeper than this are refused (requests are flat).
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class ProtocolError(Exception):
    """A request the gateway refuses; becomes an ``error`` message."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        id: str | None = None,
        call: str | None = None,
        refusal: str | None = None,
    ) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.call = call
        self.refusal = refusal


# --- client -> gateway -------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    id: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Call:
    call: str
    to: str
    sdp: str
    id: str | None = None
    #: Extra SIP headers for the INVITE, checked here for syntax and by the call
    #: manager against ``sip.allowed_headers``.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hangup:
    call: str
    id: str | None = None


@dataclass(frozen=True)
class Ping:
    id: str | None = None


@dataclass(frozen=True)
class Dtmf:
    call: str
    #: Upper-case, from ``0-9 * # A-D``.
    digits: str
    #: ``rfc4733`` (telephone-events in the RTP) or ``info`` (SIP INFO).
    method: str = "rfc4733"
    id: str | None = None


@dataclass(frozen=True)
class Hold:
    call: str
    id: str | None = None


@dataclass(frozen=True)
class Unhold:
    call: str
    id: str | None = None


@dataclass(frozen=True)
class Register:
    user: str
    #: None for a server-side account (the password is in the gateway's config).
    password: str | None = field(default=None, repr=False)
    display_name: str = ""
    domain: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Unregister:
    user: str
    id: str | None = None


@dataclass(frozen=True)
class Accept:
    call: str
    sdp: str
    id: str | None = None


@dataclass(frozen=True)
class Reject:
    call: str
    code: int = 486
    id: str | None = None


@dataclass(frozen=True)
class Transfer:
    """Blind (``to``, routed by the dialplan) or attended (``replaces``: another call)."""

    call: str
    to: str | None = None
    replaces: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class TransferAccept:
    """Follow the far end's ``transfer_request`` on ``call``: place ``new_call`` with ``sdp``."""

    call: str
    new_call: str
    sdp: str
    id: str | None = None


@dataclass(frozen=True)
class TransferReject:
    call: str
    id: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A trickled ICE candidate of the browser; ``candidate`` ``None``: end of candidates."""

    call: str
    candidate: str | None
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None
    id: str | None = None


Request = (
    Hello
    | Call
    | Hangup
    | Ping
    | Dtmf
    | Hold
    | Unhold
    | Register
    | Unregister
    | Accept
    | Reject
    | Transfer
    | TransferAccept
    | TransferReject
    | Candidate
)


# --- gateway -> client -------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    type: ClassVar[str] = "welcome"
    version: int
    session: str
    ice_servers: list[dict[str, Any]]
    id: str | None = None
    #: The token's ``sub``, when the gateway checks tokens.
    user: str | None = None


@dataclass(frozen=True)
class Answer:
    type: ClassVar[str] = "answer"
    call: str
    sdp: str
    id: str | None = None


@dataclass(frozen=True)
class Ringing:
    type: ClassVar[str] = "ringing"
    call: str
    code: int
    reason: str


@dataclass(frozen=True)
class Progress:
    type: ClassVar[str] = "progress"
    call: str
    code: int
    reason: str


@dataclass(frozen=True)
class Accepted:
    type: ClassVar[str] = "accepted"
    call: str
    codecs: dict[str, str]


@dataclass(frozen=True)
class HangupEvent:
    type: ClassVar[str] = "hangup"
    call: str
    code: int
    reason: str
    by: str
    #: The machine-readable ending: a row label of ``gateway.outcomes`` (``ice_failed``).
    outcome: str
    id: str | None = None


@dataclass(frozen=True)
class Held:
    type: ClassVar[str] = "held"
    call: str
    by: str
    id: str | None = None


@dataclass(frozen=True)
class Resumed:
    type: ClassVar[str] = "resumed"
    call: str
    by: str
    id: str | None = None


@dataclass(frozen=True)
class DtmfEvent:
    type: ClassVar[str] = "dtmf"
    call: str
    digit: str
    method: str
    duration: int | None = None


@dataclass(frozen=True)
class TransferEvent:
    """The transfer's progress on ``call``, from the far end's NOTIFY (``final``: the end)."""

    type: ClassVar[str] = "transfer"
    call: str
    code: int
    reason: str
    final: bool
    id: str | None = None


@dataclass(frozen=True)
class TransferRequest:
    """The far end asked (REFER) that ``call`` be transferred to ``to``."""

    type: ClassVar[str] = "transfer_request"
    call: str
    to: str


@dataclass(frozen=True)
class Registered:
    type: ClassVar[str] = "registered"
    user: str
    expires: int
    id: str | None = None


@dataclass(frozen=True)
class RegistrationFailed:
    type: ClassVar[str] = "registration_failed"
    user: str
    code: int
    reason: str
    id: str | None = None


@dataclass(frozen=True)
class Unregistered:
    type: ClassVar[str] = "unregistered"
    user: str
    reason: str
    id: str | None = None


@dataclass(frozen=True)
class Incoming:
    type: ClassVar[str] = "incoming"
    call: str
    caller: str = field(metadata={"wire": "from"})
    display_name: str
    to: str
    sdp: str


@dataclass(frozen=True)
class Pong:
    type: ClassVar[str] = "pong"
    id: str | None = None


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None
    call: str | None = None
    #: For a ``call`` that never started: why, one label per limit or check
    #: (``user_call_limit``, ``no_route``...; the refusals table of the protocol).
    refusal: str | None = None

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Error:
        return cls(exc.code, exc.message, exc.id, exc.call, exc.refusal)


Event = (
    Welcome
    | Answer
    | Ringing
    | Progress
    | Accepted
    | HangupEvent
    | Held
    | Resumed
    | DtmfEvent
    | TransferEvent
    | TransferRequest
    | Registered
    | RegistrationFailed
    | Unregistered
    | Incoming
    | Pong
    | Error
)


def encode(message: Event) -> str:
    """Serialize a gateway message; ``None`` fields are left out."""
    body: dict[str, Any] = {"type": message.type}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if value is not None:
            body[f.metadata.get("wire", f.name)] = value
    return json.dumps(body, separators=(",", ":"))


# --- parsing -----------------------------------------------------------------------


def parse(text: str) -> Request:
    """Parse one client text frame, raising :class:`ProtocolError` on any problem.

    The JSON must be strict: no key twice in an object, no ``NaN`` or
    ``Infinity``, no number that overflows a float, no integer of more than
    :data:`MAX_INT_DIGITS` digits, no unpaired UTF-16 surrogate escape in a
    string, and no nesting deeper than :data:`MAX_DEPTH`.
    """
    try:
        data = json.loads(
            text,
            object_pairs_hook=_strict_object,
            parse_constant=_refuse_constant,
            parse_int=_strict_int,
            parse_float=_strict_float,
        )
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            "bad_request",
            f"message is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
        ) from None
    except RecursionError:
        raise ProtocolError("bad_request", _TOO_DEEP) from None
    _check_values(data)
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "message must be a JSON object")
    request_id = _optional_id(data)
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "message has no string field 'type'", id=request_id)
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError("bad_request", f"unknown message type {_shown(kind)}", id=request_id)
    return parser(data, request_id)


# json.loads hooks: the standard parser, with the laxities JSON allows refused.

_TOO_DEEP = f"message is nested more than {MAX_DEPTH} levels deep"


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ProtocolError("bad_request", f"message has a duplicate key {_shown(key)}")
            seen.add(key)
    return data


def _refuse_constant(name: str) -> Any:
    # Only NaN, Infinity and -Infinity reach this hook.
    raise ProtocolError("bad_request", f"message is not valid JSON: {name} is not a number")


def _strict_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(
            "bad_request", f"message has an integer of more than {MAX_INT_DIGITS} digits"
        )
    return int(digits)


def _strict_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ProtocolError("bad_request", "message has a number too large to represent")
    return value


def _check_values(data: object) -> None:
    """Refuse unpaired surrogates in any string or key, and nesting deeper than MAX_DEPTH."""
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise ProtocolError("bad_request", _TOO_DEEP)
            if isinstance(value, dict):
                stack.extend((key, depth) for key in value)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise ProtocolError(
                "bad_request", "message has a string with an unpaired surrogate (U+D800 to U+DFFF)"
            )


def _shown(value: str) -> str:
    """``value`` quoted if it is a plain name, else a description (never echo raw input)."""
    if _ID.fullmatch(value):
        return f"'{value}'"
    if not value:
        return "(empty)"
    return f"(not shown: {len(value)} character(s), not all of A-Z a-z 0-9 _ . : @ -)"


def _optional_id(data: dict[str, Any]) -> str | None:
    value = data.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(
            "bad_request", "field 'id' must be a string of 1-64 letters, digits or _.:@-"
        )
    return value


def _string(
    data: dict[str, Any], key: str, request_id: str | None, *, call: str | None = None
) -> str:
    value = data.get(key)
    if value is None:
        raise ProtocolError(
            "bad_request", f"{data['type']}: missing field {key!r}", id=request_id, call=call
        )
    if not isinstance(value, str):
        raise ProtocolError(
            "bad_request",
            f"{data['type']}: field {key!r} must be a string, not {_json_type(value)}",
            id=request_id,
            call=call,
        )
    return value


def _call_id(data: dict[str, Any], request_id: str | None) -> str:
    value = _string(data, "call", request_id)
    if not _ID.fullmatch(value):
        raise ProtocolError(
            "bad_request",
            f"{data['type']}: field 'call' must be 1-64 letters, digits or _.:@-",
            id=request_id,
        )
    return value


def _parse_hello(data: dict[str, Any], request_id: str | None) -> Hello:
    token = data.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("bad_request", "hello: field 'token' must be a string", id=request_id)
    return Hello(id=request_id, token=token)


def _parse_call(data: dict[str, Any], request_id: str | None) -> Call:
    call = _call_id(data, request_id)
    to = _string(data, "to", request_id, call=call)
    sdp = _string(data, "sdp", request_id, call=call)
    if len(sdp.encode("utf-8", "surrogatepass")) > MAX_SDP_BYTES:
        raise ProtocolError(
            "bad_request",
            f"call: field 'sdp' is longer than {MAX_SDP_BYTES} bytes",
            id=request_id,
            call=call,
        )
    return Call(call=call, to=to, sdp=sdp, id=request_id, headers=_headers(data, request_id, call))


def _headers(
    data: dict[str, Any], request_id: str | None, call: str
) -> tuple[tuple[str, str], ...]:
    value = data.get("headers")
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ProtocolError(
            "bad_request",
            "call: field 'headers' must be an object of header names to strings",
            id=request_id,
            call=call,
        )
    if len(value) > MAX_HEADERS:
        raise ProtocolError(
            "bad_request",
            f"call: at most {MAX_HEADERS} headers",
            id=request_id,
            call=call,
        )
    for name, text in value.items():
        problem = header_problem(name, text)
        if problem is not None:
            raise ProtocolError("bad_request", f"call: {problem}", id=request_id, call=call)
    return tuple(value.items())


def _parse_hangup(data: dict[str, Any], request_id: str | None) -> Hangup:
    return Hangup(call=_call_id(data, request_id), id=request_id)


def _parse_ping(data: dict[str, Any], request_id: str | None) -> Ping:
    return Ping(id=request_id)


#: Digits a ``dtmf`` request may carry (RFC 4733 events 0-15), at most 32 at once.
_DIGITS = re.compile(r"[0-9A-Da-d*#]{1,32}")
DTMF_METHODS = ("rfc4733", "info")


def _parse_dtmf(data: dict[str, Any], request_id: str | None) -> Dtmf:
    call = _call_id(data, request_id)
    digits = _string(data, "digits", request_id, call=call)
    if not _DIGITS.fullmatch(digits):
        raise ProtocolError(
            "bad_request",
            "dtmf: field 'digits' must be 1-32 of 0-9 * # A B C D",
            id=request_id,
            call=call,
        )
    method = data.get("method", "rfc4733")
    if method not in DTMF_METHODS:
        raise ProtocolError(
            "bad_request",
            "dtmf: field 'method' must be 'rfc4733' or 'info'",
            id=request_id,
            call=call,
        )
    return Dtmf(call=call, digits=digits.upper(), method=method, id=request_id)


def _parse_hold(data: dict[str, Any], request_id: str | None) -> Hold:
    return Hold(call=_call_id(data, request_id), id=request_id)


def _parse_unhold(data: dict[str, Any], request_id: str | None) -> Unhold:
    return Unhold(call=_call_id(data, request_id), id=request_id)


#: A SIP user part: what may stand before the ``@`` without escaping (RFC 3261).
_USER = re.compile(r"[A-Za-z0-9_.!~*'()+-]{1,64}")
#: Printable, no quotes, angle brackets or backslash: safe inside a quoted display name.
_DISPLAY = re.compile(r"[^\x00-\x1f\x7f\"<>\\]{0,64}")
MAX_PASSWORD = 256


def _parse_register(data: dict[str, Any], request_id: str | None) -> Register:
    user = _string(data, "user", request_id)
    if not _USER.fullmatch(user):
        raise ProtocolError(
            "bad_request",
            "register: field 'user' must be 1-64 letters, digits or - _ . ! ~ * ' ( ) +",
            id=request_id,
        )
    password = data.get("password")
    if password is not None and (
        not isinstance(password, str)
        or not 0 < len(password) <= MAX_PASSWORD
        or any(ord(c) < 32 or ord(c) == 127 for c in password)
    ):
        raise ProtocolError(
            "bad_request",
            f"register: field 'password' must be 1-{MAX_PASSWORD} printable characters",
            id=request_id,
        )
    display = data.get("display_name", "")
    if not isinstance(display, str) or not _DISPLAY.fullmatch(display):
        raise ProtocolError(
            "bad_request",
            "register: field 'display_name' must be at most 64 characters, "
            "without quotes, < > \\ or control characters",
            id=request_id,
        )
    domain = data.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise ProtocolError(
            "bad_request", "register: field 'domain' must be a string", id=request_id
        )
    return Register(user, password, display, domain, request_id)


def _parse_unregister(data: dict[str, Any], request_id: str | None) -> Unregister:
    user = _string(data, "user", request_id)
    if not _USER.fullmatch(user):
        raise ProtocolError(
            "bad_request", "unregister: field 'user' is not a user name", id=request_id
        )
    return Unregister(user, request_id)


def _parse_accept(data: dict[str, Any], request_id: str | None) -> Accept:
    call = _call_id(data, request_id)
    sdp = _string(data, "sdp", request_id, call=call)
    if len(sdp.encode("utf-8", "surrogatepass")) > MAX_SDP_BYTES:
        raise ProtocolError(
            "bad_request",
            f"accept: field 'sdp' is longer than {MAX_SDP_BYTES} bytes",
            id=request_id,
            call=call,
        )
    return Accept(call, sdp, request_id)


def _parse_reject(data: dict[str, Any], request_id: str | None) -> Reject:
    call = _call_id(data, request_id)
    code = data.get("code", 486)
    if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 699:
        raise ProtocolError(
            "bad_request",
            "reject: field 'code' must be a SIP status from 400 to 699",
            id=request_id,
            call=call,
        )
    return Reject(call, code, request_id)


def _sdp(data: dict[str, Any], request_id: str | None, call: str) -> str:
    sdp = _string(data, "sdp", request_id, call=call)
    if len(sdp.encode("utf-8", "surrogatepass")) > MAX_SDP_BYTES:
        raise ProtocolError(
            "bad_request",
            f"{data['type']}: field 'sdp' is longer than {MAX_SDP_BYTES} bytes",
            id=request_id,
            call=call,
        )
    return sdp


def _parse_transfer(data: dict[str, Any], request_id: str | None) -> Transfer:
    call = _call_id(data, request_id)
    if ("to" in data) == ("replaces" in data):
        raise ProtocolError(
            "bad_request",
            "transfer: give exactly one of 'to' (blind) and 'replaces' (attended)",
            id=request_id,
            call=call,
        )
    if "to" in data:
        return Transfer(call, to=_string(data, "to", request_id, call=call), id=request_id)
    replaces = _string(data, "replaces", request_id, call=call)
    if not _ID.fullmatch(replaces) or replaces == call:
        raise ProtocolError(
            "bad_request",
            "transfer: field 'replaces' must be the id of another call of this connection",
            id=request_id,
            call=call,
        )
    return Transfer(call, replaces=replaces, id=request_id)


def _parse_transfer_accept(data: dict[str, Any], request_id: str | None) -> TransferAccept:
    call = _call_id(data, request_id)
    new_call = _string(data, "new_call", request_id, call=call)
    if not _ID.fullmatch(new_call):
        raise ProtocolError(
            "bad_request",
            "transfer_accept: field 'new_call' must be 1-64 letters, digits or _.:@-",
            id=request_id,
            call=call,
        )
    return TransferAccept(call, new_call, _sdp(data, request_id, call), request_id)


def _parse_transfer_reject(data: dict[str, Any], request_id: str | None) -> TransferReject:
    return TransferReject(_call_id(data, request_id), request_id)


#: ``candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...``
_CANDIDATE = re.compile(
    r"(?:candidate:)?[A-Za-z0-9+/]{1,32} [0-9]{1,3} [A-Za-z]{1,8} [0-9]{1,10} "
    r"[A-Za-z0-9.:%_-]{1,253} [0-9]{1,5} typ (?:host|srflx|prflx|relay)(?: [\x21-\x7e ]*)?"
)
MAX_CANDIDATE = 1024


def _parse_candidate(data: dict[str, Any], request_id: str | None) -> Candidate:
    call = _call_id(data, request_id)
    if "candidate" not in data:
        raise ProtocolError(
            "bad_request", "candidate: field 'candidate' is missing", id=request_id, call=call
        )
    value = data["candidate"]
    if value is None:
        return Candidate(call, None, id=request_id)
    if not isinstance(value, dict):
        raise ProtocolError(
            "bad_request",
            "candidate: field 'candidate' must be an object (RTCIceCandidateInit) or null",
            id=request_id,
            call=call,
        )
    text = value.get("candidate")
    mid = value.get("sdpMid")
    index = value.get("sdpMLineIndex")
    if not isinstance(text, str) or len(text) > MAX_CANDIDATE:
        raise ProtocolError(
            "bad_request",
            f"candidate: 'candidate.candidate' must be a string of at most {MAX_CANDIDATE}",
            id=request_id,
            call=call,
        )
    if mid is not None and (not isinstance(mid, str) or not _ID.fullmatch(mid)):
        raise ProtocolError(
            "bad_request", "candidate: 'sdpMid' must be a short string", id=request_id, call=call
        )
    if index is not None and (
        isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 64
    ):
        raise ProtocolError(
            "bad_request",
            "candidate: 'sdpMLineIndex' must be an integer from 0 to 63",
            id=request_id,
            call=call,
        )
    if text == "":  # the browser's own end-of-candidates
        return Candidate(call, None, mid, index, request_id)
    text = text.removeprefix("a=")
    if not _CANDIDATE.fullmatch(text):
        raise ProtocolError(
            "bad_request",
            "candidate: 'candidate.candidate' is not an ICE candidate attribute "
            "(candidate:<foundation> <component> <transport> <priority> <address> <port> "
            "typ <type> ...)",
            id=request_id,
            call=call,
        )
    return Candidate(call, text, mid, index, request_id)


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


_PARSERS: dict[str, Callable[[dict[str, Any], str | None], Request]] = {
    "hello": _parse_hello,
    "call": _parse_call,
    "hangup": _parse_hangup,
    "ping": _parse_ping,
    "dtmf": _parse_dtmf,
    "hold": _parse_hold,
    "unhold": _parse_unhold,
    "register": _parse_register,
    "unregister": _parse_unregister,
    "accept": _parse_accept,
    "reject": _parse_reject,
    "transfer": _parse_transfer,
    "transfer_accept": _parse_transfer_accept,
    "transfer_reject": _parse_transfer_reject,
    "candidate": _parse_candidate,
}
