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
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar, cast

from dialplan import Action, InvalidNumber, Rule, route
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

    def acquire(self, key: int, only: W | None = None) -> W:
        """A worker slot for call ``key`` (on ``only`` if given), or ``Refused``."""
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


class NotAnswered(RuntimeError):
    """The call is not answered (or is ending): hold and DTMF must wait."""


class UnknownCall(LookupError):
    """No live call of that id on that connection."""


class AlreadyEnding(RuntimeError):
    """The call is already hanging up."""


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
    ) -> None:
        self._pool = pool
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
    ) -> None:
        """Route and start a call, or raise :class:`~gateway.outcomes.Refused`.

        ``grant`` (an authenticated connection's token) narrows what may be
        dialled and how many calls the connection may have.
        """
        try:
            self._place(owner, call_id, to, sdp, request_id, grant)
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
                owner, owned, key, call_id, to, sdp, request_id, variables, grant
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
    ) -> bool:
        """Route and hand the call to a worker; ``True`` if its URI is an embedded target."""
        try:
            decision = route(to, self._rules, variables)
        except InvalidNumber as exc:
            raise Refused(Refusal.BAD_NUMBER, f"call: 'to' {exc}") from None
        if decision.action is Action.REJECT or decision.uri is None:
            refusal = Refusal.NO_ROUTE if decision.rule is None else Refusal.DIALPLAN_REJECT
            raise Refused(
                refusal, f"{to!r} may not be dialled: {decision.reason} (SIP {decision.code})"
            )
        if grant is not None and grant.dial is not None and decision.rule not in grant.dial:
            raise Refused(Refusal.TOKEN_DIAL, f"{to!r} may not be dialled with this token")
        account, only = 0, None
        registrar = variables.get("registrar")
        if registrar and self.registrations is not None and f"@{registrar}" in decision.uri:
            # A registered user calls the PBX as itself: its account, on its worker.
            held = self.registrations.active_for(cast(Any, owner))
            if held is not None:
                account, only = held
        worker = self._pool.acquire(key, only)
        if not self._pool.send(worker, StartCall(key, sdp, decision.uri, account)):
            self._pool.release(worker, key)
            raise Refused(Refusal.WORKER_UNREACHABLE, "the gateway worker is restarting")
        embedded = "embedded" in variables and f"@{variables['embedded']}" in decision.uri
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

    def hangup(self, owner: CallOwner, call_id: str, request_id: str | None) -> None:
        """Hang up a live call of ``owner`` (CANCEL or BYE).

        Raises :class:`UnknownCall` or :class:`AlreadyEnding`.
        """
        owned = self._owners.get(owner)
        call = owned.live.get(call_id) if owned else None
        if call is None:
            raise UnknownCall(call_id)
        if call.state is CallState.ENDING:
            raise AlreadyEnding(call_id)
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
        owned = self._owners.get(owner)
        call = owned.live.get(call_id) if owned else None
        if call is None:
            raise UnknownCall(call_id)
        if call.state is not CallState.CONNECTED:
            raise NotAnswered(call_id)
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
        self._calls.pop(call.key, None)
        if call.embedded and self._embedded is not None:
            self._embedded.release(call.key)
        for owned in self._owners.values():
            if owned.live.get(call.call_id) is call:
                del owned.live[call.call_id]
        self._metrics.calls_active.set(len(self._calls))
        self._metrics.calls_active_by_worker.labels(str(call.worker.index)).dec()
        if not self._calls:
            self._idle.set()
