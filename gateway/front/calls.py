"""The front's call manager: routing, limits, worker slots, and the calls' fate.

No I/O. A session's ``call`` is refused or routed through the dialplan
(nothing it does not allow is dialled), given a slot on a worker through a
small :class:`Pool` interface and handed to that worker; the worker's events
come back through :meth:`CallManager.on_worker_message` (a handler table) and
reach the owning session in call terms (:class:`CallOwner`). Only the session
turns them into wire messages. A closed connection, a dead worker or shutdown
ends the calls concerned on both legs.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar, cast

from dialplan import Action, InvalidNumber, Route, Rule, route
from dialplan.headers import IDENTITY
from gateway.ipc import (
    AcceptCall,
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
    Dialog,
    EndCall,
    FromWorker,
    RegistrationChanged,
    RejectCall,
    StartCall,
    ToWorker,
)
from gateway.limits import RateLimit, SlidingWindow, suppressed_note
from gateway.outcomes import End, Ending, Refusal, Refused, ending

from .metrics import Metrics
from .quotas import CallQuotas, QuotaLimits
from .registrations import Registrations

logger = logging.getLogger(__name__)

#: Refused calls logged per connection per minute (``sipgw_calls_refused_total`` counts all).
REFUSALS_LOGGED_PER_MINUTE = 10
#: A refused number is logged up to this many characters (it may be a 60 kB string).
LOGGED_NUMBER_LENGTH = 80


class WorkerRef(Protocol):
    """A worker, as far as the manager is concerned."""

    @property
    def index(self) -> int: ...


W = TypeVar("W", bound=WorkerRef)


class Pool(Protocol[W]):
    """The worker pool, as far as the manager is concerned."""

    def acquire(self, key: int, only: W | None = None, prefer: W | None = None) -> W:
        """A worker slot for call ``key`` (on ``only`` if given, else ``prefer`` if it may)."""
        ...

    def release(self, worker: W, key: int) -> None: ...

    def claim(self, worker: W, key: int) -> None:
        """Count incoming call ``key`` in ``worker``'s slots (the worker took it already)."""
        ...

    def send(self, worker: W, message: ToWorker) -> bool: ...


class Embedded(Protocol):
    """The embedded targets processes, as far as the manager is concerned."""

    def acquire(self, key: int) -> str:
        """The ``host:port`` call ``key`` may use for ``{embedded}``, holding a slot there."""
        ...

    def release(self, key: int) -> None: ...


class CallOwner(Protocol):
    """A signaling session, told about its calls in call terms."""

    def call_answered(self, call_id: str, sdp: str, request_id: str | None) -> None: ...

    def call_progress(self, call_id: str, code: int, reason: str) -> None: ...

    def call_accepted(self, call_id: str, webrtc_codec: str, sip_codec: str) -> None: ...

    def call_ended(self, call_id: str, result: Ending, request_id: str | None) -> None: ...

    def call_refused(
        self, call_id: str, refusal: Refusal, message: str, request_id: str | None
    ) -> None: ...

    def call_held(self, call_id: str, held: bool, by: str, request_id: str | None) -> None: ...

    def call_dtmf(self, call_id: str, digit: str, method: str, duration: int) -> None: ...

    def call_control_failed(
        self, call_id: str, error: str, message: str, request_id: str | None
    ) -> None: ...

    def call_incoming(
        self, call_id: str, from_uri: str, display_name: str, to_uri: str, sdp: str
    ) -> None: ...

    def call_transfer(
        self, call_id: str, code: int, reason: str, final: bool, request_id: str | None
    ) -> None: ...

    def call_transfer_request(self, call_id: str, to: str) -> None: ...


@dataclass(frozen=True)
class Grant:
    """What an authenticated connection may do: its token's claims, checked."""

    #: The token's ``sub``.
    user: str
    #: Dialplan rule names the connection may use (``None``: any rule).
    dial: frozenset[str] | None = None
    #: Live calls the connection may have (``None``: ``http.max_calls_per_connection``).
    max_calls: int | None = None
    #: The token's ``exp`` (Unix time): no new call after it.
    expires: float = float("inf")
    #: Seconds each answered call may last (the token's ``max_duration``; None: no claim).
    max_duration: float | None = None


class NotAnswered(RuntimeError):
    """The call is not answered (or is ending): hold and DTMF must wait."""


class UnknownCall(LookupError):
    """No live call of that id on that connection."""


class AlreadyEnding(RuntimeError):
    """The call is already hanging up."""


class NoTransferRequest(RuntimeError):
    """The far end has not asked (REFER) for this call to be transferred."""


class TransferUnavailable(RuntimeError):
    """An attended transfer between calls on two different workers."""


class CallState(Enum):
    RINGING = "ringing"  # incoming: offered to the user's connections
    ACCEPTING = "accepting"  # incoming: accepted, waiting for ICE and the 200 OK
    STARTING = "starting"  # handed to a worker, which is answering the offer
    INVITING = "inviting"  # answer sent to the browser, INVITE out
    EARLY = "early"  # 18x received
    CONNECTED = "connected"  # 200 OK
    ENDING = "ending"  # hangup requested, waiting for the worker's CallEnded


@dataclass(eq=False)
class FrontCall(Generic[W]):
    """One live call as the front sees it."""

    key: int
    call_id: str
    to: str
    uri: str
    owner: CallOwner
    worker: W
    request_id: str | None = None
    #: The call holds a slot of the embedded targets (its route used ``{embedded}``).
    embedded: bool = False
    state: CallState = CallState.STARTING
    hangup_request_id: str | None = None
    started: float = field(default_factory=time.monotonic)
    #: The SIP dialog, once formed: what ends the SIP leg if the worker dies.
    dialog: Dialog | None = None
    #: An incoming call; until accepted it rings on every connection of the user.
    incoming: bool = False
    #: What the far end's last REFER asked this call be transferred to (the number).
    transfer_target: str | None = None
    #: This call follows such a request on the owner's call of this id: once it is
    #: answered, that call ends as transferred.
    transfer_of: str | None = None
    #: Counted in the quotas (placed calls): the token's user and the source address.
    user: str | None = None
    address: str | None = None


@dataclass
class _OwnerCalls(Generic[W]):
    #: ``call`` requests in the last second.
    attempts: SlidingWindow
    live: dict[str, FrontCall[W]] = field(default_factory=dict)
    #: Call ids handed to a worker on this connection: never reused.
    used: set[str] = field(default_factory=set)
    #: A connection can send refused calls as fast as it likes; its log lines are limited.
    refusal_log: RateLimit = field(
        default_factory=lambda: RateLimit(REFUSALS_LOGGED_PER_MINUTE, 60.0)
    )


#: A number a REFER's target may name: what the dialplan may be asked to route.
_REFER_USER = re.compile(r"[A-Za-z0-9+*#._-]{1,64}")


def _granted(decision: Route, dial: frozenset[str]) -> bool:
    """Whether a token's ``dial`` claim allows the route: its rule's name, or (for a
    number an ``e164`` rule recognised) an E.164 prefix such as ``+1`` or ``+4420``."""
    if decision.rule in dial:
        return True
    e164 = decision.e164
    return e164 is not None and any(p.startswith("+") and e164.startswith(p) for p in dial)


def refer_target(uri: str) -> str | None:
    """The user part of a Refer-To URI (``<sip:1003@pbx;transport=udp?Replaces=...>``).

    Only the user part goes to the dialplan: where it leads is the gateway's
    choice, never the URI's host. ``None`` when there is no plausible number.
    """
    value = uri.strip().strip("<>")
    scheme, _, rest = value.partition(":")
    if scheme.lower() not in ("sip", "sips", "tel") or not rest:
        return None
    user = rest.split("@", 1)[0] if "@" in rest else (rest if scheme.lower() == "tel" else "")
    user = user.split(";", 1)[0].split("?", 1)[0]
    return user if _REFER_USER.fullmatch(user) else None


class CallManager(Generic[W]):
    """Owns every live call of the front process."""

    def __init__(
        self,
        pool: Pool[W],
        rules: Sequence[Rule],
        variables: Mapping[str, str],
        metrics: Metrics,
        max_calls_per_owner: int,
        max_call_rate: int = 10,
        clock: Callable[[], float] = time.monotonic,
        on_orphaned: Callable[[Dialog, Ending], None] | None = None,
        embedded: Embedded | None = None,
        registrations: Registrations[Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        quotas: QuotaLimits | None = None,
        allowed_headers: Sequence[str] = (),
    ) -> None:
        self._pool = pool
        self._allowed_headers = tuple(allowed_headers)
        self.quotas = CallQuotas(quotas or QuotaLimits(), clock)
        self.registrations = registrations
        self._embedded = embedded
        self._rules = tuple(rules)
        self._variables = dict(variables)
        self._metrics = metrics
        self._max_per_owner = max_calls_per_owner
        self._max_call_rate = max_call_rate
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_orphaned = on_orphaned
        self._keys = itertools.count(1)
        self._calls: dict[int, FrontCall[W]] = {}
        self._owners: dict[CallOwner, _OwnerCalls[W]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True
        self._handlers: dict[type[FromWorker], Callable[[W, Any], None]] = {
            CallAnswer: self._on_answer,
            CallProgress: self._on_progress,
            CallAccepted: self._on_accepted,
            CallRefused: self._on_refused,
            CallEnded: self._on_ended,
            CallDialog: self._on_dialog,
            CallHold: self._on_hold,
            CallDtmf: self._on_dtmf,
            CallTransfer: self._on_transfer,
            CallTransferRequest: self._on_transfer_request,
            CallControlFailed: self._on_control_failed,
            CallIncoming: self._on_incoming,
            RegistrationChanged: self._on_registration,
            CallReleased: self._on_released,
        }

    @property
    def active(self) -> int:
        return len(self._calls)

    @property
    def connections(self) -> int:
        """Connections that placed a call and have not closed (for the census)."""
        return len(self._owners)

    def live_calls(self, owner: CallOwner) -> int:
        owned = self._owners.get(owner)
        return len(owned.live) if owned else 0

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is left; ``False`` if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- requests from sessions ---------------------------------------------------------

    def place(
        self,
        owner: CallOwner,
        call_id: str,
        to: str,
        sdp: str,
        request_id: str | None,
        grant: Grant | None = None,
        address: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Route and start a call, or raise :class:`~gateway.outcomes.Refused`.

        ``grant`` (an authenticated connection's token) narrows what may be
        dialled and how many calls the connection may have; the user's and the
        source ``address``'s quotas count across connections.
        """
        try:
            self._check_headers(headers)
            self._place(owner, call_id, to, sdp, request_id, grant, address, headers)
        except Refused as refused:
            self._metrics.call_refused(refused.refusal)
            self._log_refusal(
                owner,
                "call %s to %r refused: %s (%s)",
                call_id,
                to[:LOGGED_NUMBER_LENGTH],
                refused.refusal.error,
                refused.refusal.label,
            )
            raise

    def _place(
        self,
        owner: CallOwner,
        call_id: str,
        to: str,
        sdp: str,
        request_id: str | None,
        grant: Grant | None,
        address: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if grant is not None and self._wall_clock() >= grant.expires:
            raise Refused(
                Refusal.TOKEN_EXPIRED,
                "call: the connection's token has expired; connect again with a new token",
            )
        owned = self._owned(owner)
        if not owned.attempts.add():
            raise Refused(
                Refusal.CONNECTION_RATE,
                f"call: more than {self._max_call_rate} call requests in a second "
                "on this connection",
            )
        if call_id in owned.used:
            raise Refused(
                Refusal.DUPLICATE_ID, f"call: id {call_id!r} is already used on this connection"
            )
        if len(owned.live) >= self._max_per_owner:
            raise Refused(
                Refusal.CONNECTION_LIMIT,
                f"call: this connection already has {len(owned.live)} calls (the limit)",
            )
        if grant is not None and grant.max_calls is not None and len(owned.live) >= grant.max_calls:
            raise Refused(
                Refusal.TOKEN_CALL_LIMIT,
                f"call: this connection already has {len(owned.live)} calls "
                "(the token's max_calls)",
            )
        if not self.accepting:
            raise Refused(Refusal.SHUTTING_DOWN, "the gateway is shutting down")
        user = grant.user if grant is not None else None
        self.quotas.admit(user, address)
        try:
            self._place_admitted(owner, owned, call_id, to, sdp, request_id, grant, headers)
        except BaseException:
            self.quotas.release(user, address)
            raise
        self.quotas.started(user, address)
        call = owned.live[call_id]
        call.user, call.address = user, address

    def _place_admitted(
        self,
        owner: CallOwner,
        owned: _OwnerCalls[W],
        call_id: str,
        to: str,
        sdp: str,
        request_id: str | None,
        grant: Grant | None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        key = next(self._keys)
        targets = self._embedded
        # Picked before routing: which targets process ``{embedded}`` stands for.
        address = targets.acquire(key) if targets is not None else None
        variables = self._variables
        if address is not None:
            variables = {**variables, "embedded": address}
        embedded = False
        try:
            embedded = self._start(
                owner, owned, key, call_id, to, sdp, request_id, variables, grant, headers
            )
        finally:
            if targets is not None and not embedded:
                targets.release(key)  # refused, or routed elsewhere

    def _start(
        self,
        owner: CallOwner,
        owned: _OwnerCalls[W],
        key: int,
        call_id: str,
        to: str,
        sdp: str,
        request_id: str | None,
        variables: Mapping[str, str],
        grant: Grant | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> bool:
        """Route and hand the call to a worker; ``True`` if its URI is an embedded target."""
        decision = self._route("call", to, variables, grant)
        ruled = {name.lower() for name, _ in decision.headers}
        for name, _ in headers:
            if name.lower() in ruled:
                raise Refused(
                    Refusal.BAD_HEADER, f"call: header {name} is set by the dialplan rule"
                )
        assert decision.uri is not None
        account, only = 0, None
        registrar = variables.get("registrar")
        if registrar and self.registrations is not None and f"@{registrar}" in decision.uri:
            # A registered user calls the PBX as itself: its account, on its worker.
            held = self.registrations.active_for(cast(Any, owner))
            if held is not None:
                account, only = held
        # A connection's calls share a worker where they can: an attended
        # transfer joins two calls of one pjsua2 endpoint.
        prefer = next((c.worker for c in owned.live.values()), None)
        worker = self._pool.acquire(key, only, prefer)
        max_duration = grant.max_duration or 0.0 if grant is not None else 0.0
        embedded = "embedded" in variables and f"@{variables['embedded']}" in decision.uri
        start = StartCall(
            key, sdp, decision.uri, account, max_duration, decision.headers + headers, embedded
        )
        if not self._pool.send(worker, start):
            self._pool.release(worker, key)
            raise Refused(Refusal.WORKER_UNREACHABLE, "the gateway worker is restarting")
        call = FrontCall(key, call_id, to, decision.uri, owner, worker, request_id, embedded)
        self._calls[key] = call
        owned.live[call_id] = call
        owned.used.add(call_id)
        self._idle.clear()
        self._metrics.calls_started.inc()
        self._metrics.calls_active.set(len(self._calls))
        self._metrics.calls_active_by_worker.labels(str(worker.index)).inc()
        logger.info("call %s (%s) to %s on worker %s", key, call_id, decision.uri, worker.index)
        return embedded

    def _check_headers(self, headers: tuple[tuple[str, str], ...]) -> None:
        """Refuse a browser's header that ``sip.allowed_headers`` does not name."""
        for name, _ in headers:
            lower = name.lower()
            if lower in IDENTITY or not any(
                fnmatch.fnmatchcase(lower, pattern.lower()) for pattern in self._allowed_headers
            ):
                raise Refused(
                    Refusal.BAD_HEADER, f"call: header {name} may not be set (sip.allowed_headers)"
                )

    def _route(
        self, what: str, to: str, variables: Mapping[str, str], grant: Grant | None
    ) -> Route:
        """The dialplan's decision to dial ``to``, or :class:`Refused` (and nothing is sent)."""
        try:
            decision = route(to, self._rules, variables)
        except InvalidNumber as exc:
            raise Refused(Refusal.BAD_NUMBER, f"{what}: 'to' {exc}") from None
        if decision.action is Action.REJECT or decision.uri is None:
            refusal = Refusal.NO_ROUTE if decision.rule is None else Refusal.DIALPLAN_REJECT
            raise Refused(
                refusal, f"{to!r} may not be dialled: {decision.reason} (SIP {decision.code})"
            )
        if grant is not None and grant.dial is not None and not _granted(decision, grant.dial):
            raise Refused(Refusal.TOKEN_DIAL, f"{to!r} may not be dialled with this token")
        return decision

    def transfer(
        self,
        owner: CallOwner,
        call_id: str,
        to: str | None,
        replaces: str | None,
        request_id: str | None,
        grant: Grant | None = None,
    ) -> None:
        """REFER the far end of a connected call to ``to`` (blind) or to call ``replaces``.

        A blind target goes through the dialplan (and the token's claims) like a
        call's ``to``. Raises :class:`UnknownCall`, :class:`NotAnswered`,
        :class:`Refused` or :class:`TransferUnavailable`; nothing is sent then.
        """
        call = self._connected(owner, call_id)
        uri, other_key = "", -1
        if replaces is not None:
            other = self._connected(owner, replaces)
            if other.worker is not call.worker:
                raise TransferUnavailable(
                    f"transfer: calls {call_id!r} and {replaces!r} run on different gateway "
                    "workers; an attended transfer needs both on one"
                )
            other_key = other.key
        else:
            assert to is not None
            if grant is not None and self._wall_clock() >= grant.expires:
                raise Refused(Refusal.TOKEN_EXPIRED, "transfer: the connection's token has expired")
            decision = self._route("transfer", to, self._variables, grant)
            assert decision.uri is not None
            uri = decision.uri
            logger.info("call %s (%s): transfer to %s", call.key, call_id, uri)
        self._pool.send(
            call.worker, ControlCall(call.key, "transfer", "", "", request_id, uri, other_key)
        )

    def accept_transfer(
        self,
        owner: CallOwner,
        call_id: str,
        new_call: str,
        sdp: str,
        request_id: str | None,
        grant: Grant | None = None,
        address: str = "",
    ) -> None:
        """Follow the far end's transfer request on ``call_id``: call its target as ``new_call``.

        The target goes through the dialplan like any ``to``. Once the new call is
        answered, ``call_id`` ends as transferred. Raises :class:`UnknownCall`,
        :class:`NoTransferRequest` or :class:`Refused`.
        """
        call = self._live_call(owner, call_id)
        target = call.transfer_target
        if target is None:
            raise NoTransferRequest(call_id)
        self.place(owner, new_call, target, sdp, request_id, grant, address)
        call.transfer_target = None
        placed = self._owned(owner).live.get(new_call)
        if placed is not None:
            placed.transfer_of = call_id

    def reject_transfer(self, owner: CallOwner, call_id: str) -> None:
        """Forget the far end's transfer request on ``call_id`` (its REFER was declined)."""
        call = self._live_call(owner, call_id)
        if call.transfer_target is None:
            raise NoTransferRequest(call_id)
        call.transfer_target = None

    def _not_ending(self, owner: CallOwner, call_id: str) -> FrontCall[W]:
        owned = self._owners.get(owner)
        call = owned.live.get(call_id) if owned else None
        if call is None:
            raise UnknownCall(call_id)
        if call.state is CallState.ENDING:
            raise AlreadyEnding(call_id)
        return call

    def _connected(self, owner: CallOwner, call_id: str) -> FrontCall[W]:
        owned = self._owners.get(owner)
        call = owned.live.get(call_id) if owned else None
        if call is None:
            raise UnknownCall(call_id)
        if call.state is not CallState.CONNECTED:
            raise NotAnswered(call_id)
        return call

    def hangup(self, owner: CallOwner, call_id: str, request_id: str | None) -> None:
        """Hang up a live call of ``owner`` (CANCEL or BYE).

        Raises :class:`UnknownCall` or :class:`AlreadyEnding`.
        """
        call = self._not_ending(owner, call_id)
        call.state = CallState.ENDING
        call.hangup_request_id = request_id
        self._pool.send(call.worker, EndCall(call.key))

    def control(
        self,
        owner: CallOwner,
        call_id: str,
        action: str,
        request_id: str | None,
        digits: str = "",
        method: str = "",
    ) -> None:
        """Pass an in-call request (hold, unhold, dtmf) to the call's worker.

        Raises :class:`UnknownCall` or :class:`NotAnswered`.
        """
        call = self._connected(owner, call_id)
        self._pool.send(call.worker, ControlCall(call.key, action, digits, method, request_id))

    def candidate(
        self,
        owner: CallOwner,
        call_id: str,
        candidate: str | None,
        sdp_mid: str | None,
        sdp_mline_index: int | None,
        request_id: str | None,
    ) -> None:
        """Pass a trickled ICE candidate of the browser to the call's worker.

        Raises :class:`UnknownCall`; one for a call already ending is dropped.
        """
        call = self._live_call(owner, call_id)
        if call.state is CallState.ENDING:
            return
        self._pool.send(
            call.worker, AddCandidate(call.key, candidate, sdp_mid, sdp_mline_index, request_id)
        )

    def disconnect(self, owner: CallOwner) -> None:
        """The owner's connection closed: end all its calls; nobody hears the events."""
        if self.registrations is not None:
            self.registrations.disconnect(cast(Any, owner))
        owned = self._owners.pop(owner, None)
        if owned is None:
            return
        closed = ending(End.WEBSOCKET_CLOSED)
        for call in owned.live.values():
            if call.state is not CallState.ENDING:
                call.state = CallState.ENDING
                self._pool.send(call.worker, EndCall(call.key, closed))

    def end_calls(self, keys: set[int], result: Ending) -> None:
        """End the calls ``keys`` (their SIP target died) with ``result``, telling their owners."""
        for key in keys:
            call = self._calls.get(key)
            if call is not None and call.state is not CallState.ENDING:
                call.state = CallState.ENDING
                self._pool.send(call.worker, EndCall(call.key, result))

    def end_all(self, result: Ending) -> None:
        """Shutdown: refuse new calls and end every call with ``result``, telling its owner."""
        self.accepting = False
        for call in list(self._calls.values()):
            if call.state is not CallState.ENDING:
                call.state = CallState.ENDING
                self._pool.send(call.worker, EndCall(call.key, result))

    # --- events from workers ------------------------------------------------------------

    def on_worker_message(self, worker: W, message: FromWorker) -> None:
        self._handlers[type(message)](worker, message)

    def _listening(self, call: FrontCall[W]) -> bool:
        owned = self._owners.get(call.owner)
        return owned is not None and owned.live.get(call.call_id) is call

    def _audience(self, call: FrontCall[W]) -> list[CallOwner]:
        """Every connection that hears about ``call`` (several while an incoming call rings)."""
        return [
            owner for owner, owned in self._owners.items() if owned.live.get(call.call_id) is call
        ]

    def _on_answer(self, worker: W, message: CallAnswer) -> None:
        call = self._calls.get(message.key)
        if call is None:
            return
        if call.state is CallState.STARTING:
            call.state = CallState.INVITING
        if self._listening(call):
            call.owner.call_answered(call.call_id, message.sdp, call.request_id)

    def _on_progress(self, worker: W, message: CallProgress) -> None:
        call = self._calls.get(message.key)
        if call is None:
            return
        if call.state in (CallState.INVITING, CallState.EARLY):
            call.state = CallState.EARLY
        if self._listening(call):
            call.owner.call_progress(call.call_id, message.code, message.reason)

    def _on_accepted(self, worker: W, message: CallAccepted) -> None:
        call = self._calls.get(message.key)
        if call is None:
            return
        if call.state is not CallState.ENDING:
            call.state = CallState.CONNECTED
        self._metrics.setup_seconds.observe(time.monotonic() - call.started)
        if self._listening(call):
            call.owner.call_accepted(call.call_id, message.webrtc_codec, message.sip_codec)
        if call.transfer_of is not None:
            self._end_transferred(call.owner, call.transfer_of)

    def _end_transferred(self, owner: CallOwner, call_id: str) -> None:
        """The call that followed a transfer request on ``call_id`` is up: end that one."""
        owned = self._owners.get(owner)
        old = owned.live.get(call_id) if owned else None
        if old is not None and old.state is not CallState.ENDING:
            old.state = CallState.ENDING
            self._pool.send(old.worker, EndCall(old.key, ending(End.TRANSFERRED)))

    def _on_transfer(self, worker: W, message: CallTransfer) -> None:
        call = self._calls.get(message.key)
        if call is not None and self._listening(call):
            call.owner.call_transfer(
                call.call_id, message.code, message.reason, message.final, message.request_id
            )

    def _on_transfer_request(self, worker: W, message: CallTransferRequest) -> None:
        call = self._calls.get(message.key)
        if call is None or not self._listening(call):
            return
        target = refer_target(message.target)
        if target is None:
            logger.info("call %s: REFER to %r ignored: no number in it", call.key, message.target)
            return
        call.transfer_target = target
        call.owner.call_transfer_request(call.call_id, target)

    def _on_refused(self, worker: W, message: CallRefused) -> None:
        call = self._calls.get(message.key)
        if call is None:
            return
        listening = self._listening(call)
        self._forget(call)
        self._metrics.call_refused(message.refusal)
        self._log_refusal(
            call.owner,
            "call %s (%s) refused by worker: %s (%s)",
            call.key,
            call.call_id,
            message.refusal.error,
            message.message,
        )
        if listening:
            call.owner.call_refused(call.call_id, message.refusal, message.message, call.request_id)

    def _on_ended(self, worker: W, message: CallEnded) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            self._end(call, message.ending, message.stats)

    def _on_dialog(self, worker: W, message: CallDialog) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            call.dialog = message.dialog

    def _on_hold(self, worker: W, message: CallHold) -> None:
        call = self._calls.get(message.key)
        if call is not None and self._listening(call):
            call.owner.call_held(call.call_id, message.held, message.by, message.request_id)

    def _on_dtmf(self, worker: W, message: CallDtmf) -> None:
        call = self._calls.get(message.key)
        if call is not None and self._listening(call):
            call.owner.call_dtmf(call.call_id, message.digit, message.method, message.duration)

    def _on_control_failed(self, worker: W, message: CallControlFailed) -> None:
        call = self._calls.get(message.key)
        if call is not None and self._listening(call):
            call.owner.call_control_failed(
                call.call_id, message.error, message.message, message.request_id
            )

    def _on_registration(self, worker: W, message: RegistrationChanged) -> None:
        if self.registrations is not None:
            self.registrations.on_changed(message)

    def _on_incoming(self, worker: W, message: CallIncoming) -> None:
        """A registered user's phone rings: offer the call to each of its connections."""
        registered = self.registrations.owners(message.reg) if self.registrations else []
        owners = [cast(CallOwner, o) for o in registered]
        if not owners or not self.accepting:
            self._pool.send(worker, RejectCall(message.key, 480))
            return
        self._pool.claim(worker, message.key)
        call_id = f"in-{-message.key}"
        call = FrontCall(message.key, call_id, message.to_uri, message.from_uri, owners[0], worker)
        call.incoming, call.state = True, CallState.RINGING
        self._calls[message.key] = call
        self._idle.clear()
        for owner in owners:
            owned = self._owned(owner)
            owned.live[call_id] = call
            owned.used.add(call_id)
            owner.call_incoming(
                call_id, message.from_uri, message.display_name, message.to_uri, message.offer_sdp
            )
        self._metrics.calls_started.inc()
        self._metrics.calls_active.set(len(self._calls))
        self._metrics.calls_active_by_worker.labels(str(worker.index)).inc()
        logger.info(
            "incoming call %s (%s) from %s to %s on worker %s",
            message.key,
            call_id,
            message.from_uri,
            message.to_uri,
            worker.index,
        )

    def accept(self, owner: CallOwner, call_id: str, sdp: str, request_id: str | None) -> None:
        """``owner`` answers a ringing incoming call; the other connections hear it went.

        Raises :class:`UnknownCall` or :class:`NotAnswered` (not ringing any more).
        """
        call = self._live_call(owner, call_id)
        if not call.incoming or call.state is not CallState.RINGING:
            raise NotAnswered(call_id)
        elsewhere = ending(End.ANSWERED_ELSEWHERE)
        for other in self._audience(call):
            if other is not owner:
                del self._owners[other].live[call_id]
                other.call_ended(call_id, elsewhere, None)
        call.owner, call.request_id, call.state = owner, request_id, CallState.ACCEPTING
        self._pool.send(call.worker, AcceptCall(call.key, sdp))

    def reject(self, owner: CallOwner, call_id: str, code: int, request_id: str | None) -> None:
        """``owner`` refuses a ringing incoming call with ``code`` (for every connection)."""
        call = self._live_call(owner, call_id)
        if not call.incoming or call.state is not CallState.RINGING:
            raise NotAnswered(call_id)
        call.owner, call.state, call.hangup_request_id = owner, CallState.ENDING, request_id
        self._pool.send(call.worker, RejectCall(call.key, code))

    def _owned(self, owner: CallOwner) -> _OwnerCalls[W]:
        owned = self._owners.get(owner)
        if owned is None:
            owned = _OwnerCalls(SlidingWindow(self._max_call_rate, 1.0, self._clock))
            self._owners[owner] = owned
        return owned

    def _live_call(self, owner: CallOwner, call_id: str) -> FrontCall[W]:
        owned = self._owners.get(owner)
        call = owned.live.get(call_id) if owned else None
        if call is None:
            raise UnknownCall(call_id)
        return call

    def _on_released(self, worker: W, message: CallReleased) -> None:
        self._pool.release(worker, message.key)

    def on_worker_lost(self, worker: W) -> None:
        """A worker died: its browsers hear it, its SIP peers get BYE or CANCEL from here."""
        self._metrics.worker_deaths.inc()
        if self.registrations is not None:
            self.registrations.worker_lost(worker)
        died = ending(End.WORKER_DIED)
        for call in [c for c in self._calls.values() if c.worker is worker]:
            if call.dialog is not None and self._on_orphaned is not None:
                self._on_orphaned(call.dialog, died)
            self._end(call, died, {})

    def _end(self, call: FrontCall[W], result: Ending, stats: Mapping[str, int]) -> None:
        audience = self._audience(call)
        self._forget(call)
        self._metrics.call_ended(result, stats)
        logger.info(
            "call %s (%s) ended: %s %s, by %s, after %.1f s (target %s)",
            call.key,
            call.call_id,
            result.code,
            result.reason,
            result.by,
            time.monotonic() - call.started,
            call.uri,
        )
        for owner in audience:
            mine = owner is call.owner and result.by == "local"
            owner.call_ended(call.call_id, result, call.hangup_request_id if mine else None)

    def _log_refusal(self, owner: CallOwner, fmt: str, *args: object) -> None:
        owned = self._owners.get(owner)
        suppressed = owned.refusal_log.take() if owned is not None else 0
        if suppressed is not None:
            logger.info(fmt + suppressed_note(suppressed), *args)

    def _forget(self, call: FrontCall[W]) -> None:
        if self._calls.pop(call.key, None) is not None and call.address is not None:
            self.quotas.release(call.user, call.address)
            call.address = None
        if call.embedded and self._embedded is not None:
            self._embedded.release(call.key)
        for owned in self._owners.values():
            if owned.live.get(call.call_id) is call:
                del owned.live[call.call_id]
        self._metrics.calls_active.set(len(self._calls))
        self._metrics.calls_active_by_worker.labels(str(call.worker.index)).dec()
        if not self._calls:
            self._idle.set()
