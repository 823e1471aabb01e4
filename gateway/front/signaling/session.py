"""The aiohttp WebSocket endpoint ``/ws``: one :class:`Session` per connection.

A session parses each text frame (:mod:`.messages`), hands it to a small
handler from its table, and answers any :class:`ProtocolError` with an
``error`` message while keeping the connection and its calls up. It is the
call manager's :class:`~gateway.front.calls.CallOwner`: the manager tells it
about its calls in call terms and the session turns that into wire messages.
Outgoing messages go through a bounded queue written by one task, so a slow
browser cannot make the gateway buffer without limit. When the socket closes,
its calls end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.config import IceServer
from gateway.front.calls import AlreadyEnding, CallManager, NotAnswered, UnknownCall
from gateway.front.metrics import Metrics
from gateway.front.registrations import RegistrationError
from gateway.limits import RateLimit, suppressed_note
from gateway.outcomes import Ending, Refusal, Refused

from .messages import (
    PROTOCOL_VERSION,
    Accept,
    Accepted,
    Answer,
    Call,
    Dtmf,
    DtmfEvent,
    Error,
    Event,
    Hangup,
    HangupEvent,
    Held,
    Hello,
    Hold,
    Incoming,
    Ping,
    Pong,
    Progress,
    ProtocolError,
    Register,
    Registered,
    RegistrationFailed,
    Reject,
    Request,
    Resumed,
    Ringing,
    Unhold,
    Unregister,
    Unregistered,
    Welcome,
    encode,
    parse,
)

logger = logging.getLogger(__name__)

#: Messages queued for one browser before the gateway gives up on it.
SEND_QUEUE = 256
#: With this many replies queued, the reader lets the writer run after each frame:
#: a client that sends fast but reads is served, one that does not read still
#: overflows the queue and is closed.
HIGH_WATER = SEND_QUEUE // 2
#: How long closing a browser that does not read may take before it is cut off.
CLOSE_GRACE = 2.0
#: A frame this many times over the limit closes the socket instead (aiohttp's guard).
HARD_LIMIT_FACTOR = 4
#: Unexpected handler failures logged (with traceback) per session per minute.
FAILURE_LOGS_PER_MINUTE = 3


class Session:
    """The state of one WebSocket connection."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        manager: CallManager[Any],
        ice_servers: tuple[IceServer, ...],
        max_message_bytes: int,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.id = secrets.token_urlsafe(12)
        self._ws = ws
        self._manager = manager
        self._ice_servers = ice_servers
        self._max_message_bytes = max_message_bytes
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue(SEND_QUEUE)
        self._writer: asyncio.Task[None] | None = None
        # Set once the browser stopped reading: messages are dropped from then on.
        self._closer: asyncio.Task[None] | None = None
        self._transport = transport
        self._dropped = 0
        self._failure_log = RateLimit(FAILURE_LOGS_PER_MINUTE, 60.0)
        # One small handler per request type; each takes its own request class.
        self._handlers: dict[type[Request], Callable[[Any], None]] = {
            Hello: self._on_hello,
            Call: self._on_call,
            Hangup: self._on_hangup,
            Ping: self._on_ping,
            Dtmf: self._on_dtmf,
            Hold: self._on_hold,
            Unhold: self._on_unhold,
            Register: self._on_register,
            Unregister: self._on_unregister,
            Accept: self._on_accept,
            Reject: self._on_reject,
        }

    def send(self, event: Event) -> None:
        """Queue a message for the browser (never blocks)."""
        if self._closer is not None:
            self._dropped += 1
            return
        try:
            self._outbox.put_nowait(encode(event))
        except asyncio.QueueFull:
            self._dropped += 1
            self._give_up()

    def _give_up(self) -> None:
        """Close a browser that does not read (once per session: one log line, one close)."""
        if self._closer is not None:
            return
        logger.warning("session %s: browser is not reading; closing", self.id)
        self._closer = asyncio.create_task(self._close_unread(), name=f"ws-close-{self.id}")

    async def _close_unread(self) -> None:
        """Try a clean close (1008); cut the connection if even the close frame cannot go.

        A peer that does not read leaves no room in the socket for the close frame,
        so the close handshake alone could wait for ever.
        """
        try:
            await asyncio.wait_for(
                self._ws.close(
                    code=WSCloseCode.POLICY_VIOLATION, message=b"not reading", drain=False
                ),
                CLOSE_GRACE,
            )
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()

    async def run(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.id}")
        try:
            async for frame in self._ws:
                if self._closer is not None:
                    break  # given up on this browser: stop taking its requests
                if frame.type == WSMsgType.TEXT:
                    self._receive(frame.data)
                    if self._outbox.qsize() >= HIGH_WATER:
                        await asyncio.sleep(0)  # the writer drains into the socket
                elif frame.type == WSMsgType.BINARY:
                    self.send(
                        Error("bad_request", "binary frames are not supported; send JSON text")
                    )
                elif frame.type == WSMsgType.ERROR:
                    logger.info("session %s: %s", self.id, self._ws.exception())
        finally:
            self._manager.disconnect(self)
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            if self._dropped > 1:
                logger.info(
                    "session %s: dropped %d messages the browser did not read",
                    self.id,
                    self._dropped,
                )
            if self._failure_log.suppressed:
                logger.warning(
                    "session %s: %d more request failures were not logged",
                    self.id,
                    self._failure_log.suppressed,
                )

    async def close(self, code: int, message: bytes, timeout: float) -> None:
        """Send what is queued (up to ``timeout``), then close the socket with ``code``."""
        writer = self._writer
        if writer is not None and not writer.done():
            try:
                self._outbox.put_nowait(None)
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except (asyncio.QueueFull, TimeoutError):
                pass
        await self._ws.close(code=code, message=message)

    async def _write(self) -> None:
        while (text := await self._outbox.get()) is not None:
            try:
                await self._ws.send_str(text)
            except ConnectionError:
                return

    def _receive(self, text: str) -> None:
        if len(text.encode("utf-8", "surrogatepass")) > self._max_message_bytes:
            self.send(
                Error(
                    "bad_request",
                    f"message is larger than the limit of {self._max_message_bytes} bytes",
                )
            )
            return
        try:
            request = parse(text)
            self._handlers[type(request)](request)
        except ProtocolError as exc:
            self.send(Error.from_exception(exc))
        except Exception:
            suppressed = self._failure_log.take()
            if suppressed is not None:
                logger.exception(
                    "session %s: request failed%s", self.id, suppressed_note(suppressed)
                )
            self.send(Error("internal", "the gateway failed to handle this message"))

    # --- requests ----------------------------------------------------------------------

    def _on_hello(self, request: Hello) -> None:
        servers = [{k: v for k, v in asdict(s).items() if v is not None} for s in self._ice_servers]
        for server in servers:
            server["urls"] = list(server["urls"])
        self.send(Welcome(PROTOCOL_VERSION, self.id, servers, id=request.id))

    def _on_call(self, request: Call) -> None:
        try:
            self._manager.place(self, request.call, request.to, request.sdp, request.id)
        except Refused as refused:
            raise ProtocolError(
                refused.refusal.error, refused.message, id=request.id, call=request.call
            ) from None

    def _on_hangup(self, request: Hangup) -> None:
        with _call_errors("hangup", request.call, request.id, "is already hanging up"):
            self._manager.hangup(self, request.call, request.id)

    def _on_ping(self, request: Ping) -> None:
        self.send(Pong(id=request.id))

    def _on_register(self, request: Register) -> None:
        registrations = self._manager.registrations
        try:
            if registrations is None:
                raise RegistrationError("unavailable", "register: this gateway has no registrar")
            registrations.register(
                self, request.user, request.password, request.display_name, request.id
            )
        except RegistrationError as exc:
            raise ProtocolError(exc.code, exc.message, id=request.id) from None

    def _on_unregister(self, request: Unregister) -> None:
        registrations = self._manager.registrations
        try:
            if registrations is None:
                raise RegistrationError("not_found", "unregister: nothing is registered")
            registrations.unregister(self, request.user, request.id)
        except RegistrationError as exc:
            raise ProtocolError(exc.code, exc.message, id=request.id) from None

    def _on_accept(self, request: Accept) -> None:
        self._answer_incoming("accept", request.call, request.id, request.sdp)

    def _on_reject(self, request: Reject) -> None:
        self._answer_incoming("reject", request.call, request.id, code=request.code)

    def _answer_incoming(
        self, action: str, call_id: str, request_id: str | None, sdp: str = "", code: int = 0
    ) -> None:
        with _call_errors(action, call_id, request_id, "is not an incoming call that is ringing"):
            if action == "accept":
                self._manager.accept(self, call_id, sdp, request_id)
            else:
                self._manager.reject(self, call_id, code, request_id)

    def _on_dtmf(self, request: Dtmf) -> None:
        self._control("dtmf", request.call, request.id, request.digits, request.method)

    def _on_hold(self, request: Hold) -> None:
        self._control("hold", request.call, request.id)

    def _on_unhold(self, request: Unhold) -> None:
        self._control("unhold", request.call, request.id)

    def _control(
        self, action: str, call_id: str, request_id: str | None, digits: str = "", method: str = ""
    ) -> None:
        with _call_errors(action, call_id, request_id, "is not answered (or is ending)"):
            self._manager.control(self, call_id, action, request_id, digits, method)

    # --- the call manager's news, as wire messages ----------------------------------------

    def call_answered(self, call_id: str, sdp: str, request_id: str | None) -> None:
        self.send(Answer(call_id, sdp, id=request_id))

    def call_progress(self, call_id: str, code: int, reason: str) -> None:
        cls = Ringing if code == 180 else Progress
        self.send(cls(call_id, code, reason))

    def call_accepted(self, call_id: str, webrtc_codec: str, sip_codec: str) -> None:
        self.send(Accepted(call_id, {"webrtc": webrtc_codec, "sip": sip_codec}))

    def call_ended(self, call_id: str, result: Ending, request_id: str | None) -> None:
        self.send(
            HangupEvent(call_id, result.code, result.reason, result.by, result.label, request_id)
        )

    def call_held(self, call_id: str, held: bool, by: str, request_id: str | None) -> None:
        self.send((Held if held else Resumed)(call_id, by, request_id))

    def call_dtmf(self, call_id: str, digit: str, method: str, duration: int) -> None:
        self.send(DtmfEvent(call_id, digit, method, duration or None))

    def call_control_failed(
        self, call_id: str, error: str, message: str, request_id: str | None
    ) -> None:
        self.send(Error(error, message, request_id, call_id))

    def call_incoming(
        self, call_id: str, from_uri: str, display_name: str, to_uri: str, sdp: str
    ) -> None:
        self.send(Incoming(call_id, from_uri, display_name, to_uri, sdp))

    def registered(self, user: str, expires: int, request_id: str | None) -> None:
        self.send(Registered(user, expires, request_id))

    def registration_failed(
        self, user: str, code: int, reason: str, request_id: str | None
    ) -> None:
        self.send(RegistrationFailed(user, code, reason, request_id))

    def unregistered(self, user: str, reason: str, request_id: str | None) -> None:
        self.send(Unregistered(user, reason, request_id))

    def call_refused(
        self, call_id: str, refusal: Refusal, message: str, request_id: str | None
    ) -> None:
        self.send(Error(refusal.error, message, id=request_id, call=call_id))


@contextlib.contextmanager
def _call_errors(
    action: str, call_id: str, request_id: str | None, wrong_state: str
) -> Iterator[None]:
    """Turn the call manager's refusals of a request about ``call_id`` into errors."""
    try:
        yield
    except UnknownCall:
        raise ProtocolError(
            "not_found",
            f"{action}: no call {call_id!r} on this connection",
            id=request_id,
            call=call_id,
        ) from None
    except (NotAnswered, AlreadyEnding):
        raise ProtocolError(
            "wrong_state", f"{action}: call {call_id!r} {wrong_state}", id=request_id, call=call_id
        ) from None


def websocket_handler(
    manager_key: web.AppKey[CallManager[Any]],
    metrics_key: web.AppKey[Metrics],
    ice_servers: tuple[IceServer, ...],
    max_message_bytes: int,
    sessions_key: web.AppKey[set[Session]],
    heartbeat: float = 15.0,
) -> Callable[[web.Request], Awaitable[web.WebSocketResponse]]:
    """Build the ``/ws`` handler for an app."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        # A ping every ``heartbeat`` seconds; aiohttp closes the connection when
        # its pong is missing half an interval later, and the session's calls end.
        ws = web.WebSocketResponse(
            heartbeat=heartbeat, max_msg_size=max_message_bytes * HARD_LIMIT_FACTOR
        )
        await ws.prepare(request)
        app = request.app
        metrics = app[metrics_key]
        sessions = app[sessions_key]
        session = Session(ws, app[manager_key], ice_servers, max_message_bytes, request.transport)
        sessions.add(session)
        metrics.websockets_active.set(len(sessions))
        try:
            await session.run()
        finally:
            sessions.discard(session)
            metrics.websockets_active.set(len(sessions))
        return ws

    return handle
