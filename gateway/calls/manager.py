"""The front's call bookkeeping: routing, worker assignment, events to browsers.

A browser's ``call`` is routed through the dialplan (nothing it does not allow
is dialled), given a free worker slot and handed to that worker; the worker's
events come back here and go to the browser that owns the call. A closed
WebSocket, a dead worker or shutdown ends the calls concerned on both legs.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from dialplan import Action, InvalidNumber, Rule, route
from gateway.metrics import Metrics
from gateway.signaling.messages import (
    Accepted,
    Answer,
    Error,
    Event,
    HangupEvent,
    Progress,
    ProtocolError,
    Ringing,
)
from gateway.workers.ipc import (
    CallAccepted,
    CallAnswer,
    CallEnded,
    CallProgress,
    CallRefused,
    CallReleased,
    EndCall,
    FromWorker,
    StartCall,
)
from gateway.workers.pool import WorkerHandle, WorkerPool

logger = logging.getLogger(__name__)


class CallState(Enum):
    ANSWERING = "answering"  # the worker is answering the browser's offer
    INVITING = "inviting"  # answer sent, INVITE out
    EARLY = "early"  # 18x received
    CONNECTED = "connected"  # 200 OK
    ENDING = "ending"  # hangup requested, waiting for the worker


class CallOwner(Protocol):
    """A signaling session, as far as calls are concerned."""

    @property
    def calls(self) -> dict[str, FrontCall]: ...

    def send(self, event: Event) -> None: ...


@dataclass(eq=False)
class FrontCall:
    """One live call as the front sees it."""

    key: int
    call_id: str
    owner: CallOwner
    worker: WorkerHandle
    state: CallState = CallState.ANSWERING
    request_id: str | None = None
    hangup_request_id: str | None = None
    started: float = field(default_factory=time.monotonic)


class CallManager:
    """Owns every live call of the front process."""

    def __init__(
        self,
        pool: WorkerPool,
        rules: Sequence[Rule],
        variables: Mapping[str, str],
        metrics: Metrics,
    ) -> None:
        self._pool = pool
        self._rules = tuple(rules)
        self._variables = dict(variables)
        self._metrics = metrics
        self._keys = itertools.count(1)
        self._calls: dict[int, FrontCall] = {}
        self.accepting = True

    @property
    def active(self) -> int:
        return len(self._calls)

    # --- requests from browsers --------------------------------------------------------

    def place(
        self, owner: CallOwner, call_id: str, to: str, sdp: str, request_id: str | None
    ) -> None:
        """Route and start a call, or raise :class:`ProtocolError`."""
        if not self.accepting:
            raise ProtocolError(
                "unavailable", "the gateway is shutting down", id=request_id, call=call_id
            )
        try:
            decision = route(to, self._rules, self._variables)
        except InvalidNumber as exc:
            raise ProtocolError(
                "bad_request", f"call: 'to' {exc}", id=request_id, call=call_id
            ) from None
        if decision.action is Action.REJECT or decision.uri is None:
            self._metrics.calls_refused["forbidden"] += 1
            raise ProtocolError(
                "forbidden",
                f"{to!r} may not be dialled: {decision.reason} (SIP {decision.code})",
                id=request_id,
                call=call_id,
            )
        key = next(self._keys)
        if not any(w.ready for w in self._pool.workers):
            self._metrics.calls_refused["unavailable"] += 1
            raise ProtocolError(
                "unavailable",
                "no gateway worker is running; try again shortly",
                id=request_id,
                call=call_id,
            )
        worker = self._pool.acquire(key)
        if worker is None:
            self._metrics.calls_refused["busy"] += 1
            raise ProtocolError(
                "busy", "every gateway worker is at its call limit", id=request_id, call=call_id
            )
        call = FrontCall(key, call_id, owner, worker, request_id=request_id)
        if not self._pool.send(worker, StartCall(key, sdp, decision.uri)):
            worker.slots.discard(key)
            raise ProtocolError(
                "unavailable", "the gateway worker is restarting", id=request_id, call=call_id
            )
        self._calls[key] = call
        owner.calls[call_id] = call
        self._metrics.calls_started += 1
        self._metrics.calls_active = len(self._calls)
        logger.info("call %s (%s) to %s on worker %s", key, call_id, decision.uri, worker.index)

    def hangup(self, owner: CallOwner, call_id: str, request_id: str | None) -> None:
        """Hang up a call of ``owner`` (CANCEL or BYE), or raise :class:`ProtocolError`."""
        call = owner.calls.get(call_id)
        if call is None:
            raise ProtocolError(
                "not_found",
                f"hangup: no call {call_id!r} on this connection",
                id=request_id,
                call=call_id,
            )
        if call.state is CallState.ENDING:
            raise ProtocolError(
                "wrong_state",
                f"hangup: call {call_id!r} is already hanging up",
                id=request_id,
                call=call_id,
            )
        call.state = CallState.ENDING
        call.hangup_request_id = request_id
        self._pool.send(call.worker, EndCall(call.key))

    def drop_owner(self, owner: CallOwner) -> None:
        """The owner's WebSocket closed: end all its calls; nobody hears the events."""
        for call in list(owner.calls.values()):
            if call.state is not CallState.ENDING:
                call.state = CallState.ENDING
                self._pool.send(call.worker, EndCall(call.key))
        owner.calls.clear()

    def end_all(self, code: int, reason: str) -> None:
        """Shutdown: end every call, telling its browser."""
        self.accepting = False
        for call in list(self._calls.values()):
            if call.state is not CallState.ENDING:
                call.state = CallState.ENDING
                self._pool.send(call.worker, EndCall(call.key, code, reason, "gateway"))

    # --- events from workers -----------------------------------------------------------

    def on_worker_message(self, worker: WorkerHandle, message: FromWorker) -> None:
        call = self._calls.get(getattr(message, "key", -1))
        if isinstance(message, CallReleased) or call is None:
            return
        owner, call_id = call.owner, call.call_id
        listening = owner.calls.get(call_id) is call
        if isinstance(message, CallAnswer):
            if call.state is CallState.ANSWERING:
                call.state = CallState.INVITING
            if listening:
                owner.send(Answer(call_id, message.sdp, id=call.request_id))
        elif isinstance(message, CallProgress):
            if call.state in (CallState.INVITING, CallState.EARLY):
                call.state = CallState.EARLY
            if listening:
                cls = Ringing if message.code == 180 else Progress
                owner.send(cls(call_id, message.code, message.reason))
        elif isinstance(message, CallAccepted):
            if call.state is not CallState.ENDING:
                call.state = CallState.CONNECTED
            self._metrics.setup_seconds_sum += time.monotonic() - call.started
            self._metrics.setup_count += 1
            if listening:
                codecs = {"webrtc": message.webrtc_codec, "sip": message.sip_codec}
                owner.send(Accepted(call_id, codecs))
        elif isinstance(message, CallRefused):
            self._forget(call)
            self._metrics.calls_refused[message.error] += 1
            if listening:
                owner.send(Error(message.error, message.message, id=call.request_id, call=call_id))
        elif isinstance(message, CallEnded):
            self._forget(call)
            self._metrics.calls_ended[str(message.code)] += 1
            for name, count in message.stats.items():
                self._metrics.frames[name] += count
            if listening:
                request_id = call.hangup_request_id if message.by == "local" else None
                owner.send(
                    HangupEvent(call_id, message.code, message.reason, message.by, id=request_id)
                )

    def on_worker_lost(self, worker: WorkerHandle) -> None:
        """A worker died: its calls are gone on both legs as far as we can tell."""
        self._metrics.worker_deaths += 1
        for call in [c for c in self._calls.values() if c.worker is worker]:
            listening = call.owner.calls.get(call.call_id) is call
            self._forget(call)
            if not listening:
                continue
            call.owner.send(
                HangupEvent(call.call_id, 500, "Gateway worker stopped unexpectedly", "gateway")
            )

    def _forget(self, call: FrontCall) -> None:
        self._calls.pop(call.key, None)
        if call.owner.calls.get(call.call_id) is call:
            del call.owner.calls[call.call_id]
        self._metrics.calls_active = len(self._calls)
