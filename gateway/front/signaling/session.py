"""The aiohttp WebSocket endpoint ``/ws``: one :class:`Session` per connection.

A session parses each text frame (:mod:`.messages`), hands it to a small
handler from its table, and answers any :class:`ProtocolError` with an
``error`` message while keeping the connection and its calls up. It is the
call manager's :class:`~gateway.front.calls.CallOwner`: the manager tells it
about its calls in call terms and the session turns that into wire messages.
Outgoing messages go through a bounded queue written by one task, so a slow
browser cannot make the gateway buffer without limit. When the socket closes,
its calls end.

With a token verifier (``[auth]`` on), the first message must be a ``hello``
whose token checks out: anything else gets ``unauthorized`` and the socket is
closed with 1008 before any request is handled. Every connection's messages
are counted in a sliding window; those beyond the limit get ``rate_limited``
and are not read. :func:`websocket_handler` checks the ``Origin`` and the
connections per source address before the upgrade (403, 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from gateway.config import IceServer
from gateway.front.auth import (
    ClientAddress,
    ConnectionCounter,
    OriginPolicy,
    TokenVerifier,
    Unauthorized,
)
from gateway.front.calls import (
    AlreadyEnding,
    CallManager,
    Grant,
    NotAnswered,
    NoTransferRequest,
    TransferUnavailable,
    UnknownCall,
)
from gateway.front.metrics import Metrics
from gateway.front.registrations import RegistrationError
from gateway.limits import RateLimit, SlidingWindow, suppressed_note
from gateway.outcomes import Ending, Refusal, Refused

from .messages import (
    PROTOCOL_VERSION,
    Accept,
    Accepted,
    Answer,
    Call,
    Candidate,
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
    Transfer,
    TransferAccept,
    TransferEvent,
    TransferReject,
    TransferRequest,
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
#: Seconds a connection has to send its ``hello`` with a token when auth is on.
HELLO_TIMEOUT = 10.0
#: Refused connections (token, origin, address) logged per minute, all sessions together.
REFUSALS_LOGGED_PER_MINUTE = 10
_refusal_log = RateLimit(REFUSALS_LOGGED_PER_MINUTE, 60.0)


def _log_refusal(fmt: str, *args: object) -> None:
    """Log one refused connection; a stranger can cause any number, so they are limited."""
    suppressed = _refusal_log.take()
    if suppressed is not None:
        logger.info(fmt + suppressed_note(suppressed), *args)


class Session:
    """The state of one WebSocket connection."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        manager: CallManager[Any],
        ice_servers: tuple[IceServer, ...],
        max_message_bytes: int,
        transport: asyncio.Transport | None = None,
        *,
        verifier: TokenVerifier | None = None,
        max_messages_per_second: int = 0,
        metrics: Metrics | None = None,
        peer: str = "",
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
        # Authentication: with a verifier, nothing but a hello with a good token
        # gets through until ``grant`` is set.
        self._verifier = verifier
        self.grant: Grant | None = None
        #: Why the connection was refused (it is closing with 1008), if it was.
        self.refusal: str | None = None
        self._refusal_close: asyncio.Task[None] | None = None
        self._messages = (
            SlidingWindow(max_messages_per_second, 1.0) if max_messages_per_second else None
        )
        self._metrics = metrics
        self._peer = peer
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
            Transfer: self._on_transfer,
            TransferAccept: self._on_transfer_accept,
            TransferReject: self._on_transfer_reject,
            Candidate: self._on_candidate,
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
        hello_timer = None
        if self._verifier is not None:
            hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_timeout)
        try:
            async for frame in self._ws:
                if self._closer is not None or self.refusal is not None:
                    break  # given up on this browser: stop taking its requests
                if frame.type == WSMsgType.TEXT:
                    self._receive(frame.data)
                    if self.refusal is not None:
                        break
                    if self._outbox.qsize() >= HIGH_WATER:
                        await asyncio.sleep(0)  # the writer drains into the socket
                elif self._awaiting_token:
                    self._unauthorized("the first message must be hello with a token", None)
                    break
                elif frame.type == WSMsgType.BINARY:
                    self.send(
                        Error("bad_request", "binary frames are not supported; send JSON text")
                    )
                elif frame.type == WSMsgType.ERROR:
                    logger.info("session %s: %s", self.id, self._ws.exception())
        finally:
            if hello_timer is not None:
                hello_timer.cancel()
            if self._refusal_close is not None:
                await self._refusal_close  # the error reaches the client, then 1008
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
        if self._awaiting_token:
            self._authenticate(text)
            return
        if self._messages is not None and not self._messages.add():
            self._rate_limited()
            return
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

    # --- who may talk, and how fast ---------------------------------------------------

    @property
    def _awaiting_token(self) -> bool:
        return self._verifier is not None and self.grant is None

    def _authenticate(self, text: str) -> None:
        """The first message with auth on: a hello with a good token, or the door closes."""
        assert self._verifier is not None
        request: Request | None = None
        if len(text.encode("utf-8", "surrogatepass")) <= self._max_message_bytes:
            try:
                request = parse(text)
            except ProtocolError:
                pass
        request_id = request.id if request is not None else None
        if not isinstance(request, Hello) or request.token is None:
            self._unauthorized("the first message must be hello with a token", request_id)
            return
        try:
            self.grant = self._verifier.verify(request.token)
        except Unauthorized as exc:
            self._unauthorized(exc.message, request_id)
            return
        except Exception:
            logger.exception("session %s: checking a token failed", self.id)
            self._unauthorized("the token could not be checked", request_id)
            return
        logger.info("session %s: user %r from %s", self.id, self.grant.user, self._peer)
        self._on_hello(request)

    def _unauthorized(self, message: str, request_id: str | None) -> None:
        """Refuse the connection: ``unauthorized``, then close with 1008 (policy violation)."""
        if self.refusal is not None:
            return
        self.refusal = message
        _log_refusal("session %s from %s: unauthorized: %s", self.id, self._peer, message)
        if self._metrics is not None:
            self._metrics.websockets_refused.labels("unauthorized").inc()
        self.send(Error("unauthorized", message, request_id))
        self._refusal_close = asyncio.create_task(
            self.close(WSCloseCode.POLICY_VIOLATION, b"unauthorized", CLOSE_GRACE),
            name=f"ws-refuse-{self.id}",
        )

    def _hello_timeout(self) -> None:
        if self._awaiting_token:
            self._unauthorized(f"no hello with a token within {HELLO_TIMEOUT:g} s", None)

    def _rate_limited(self) -> None:
        if self._metrics is not None:
            self._metrics.messages_rate_limited.inc()
        assert self._messages is not None
        self.send(
            Error(
                "rate_limited",
                f"more than {self._messages.limit} messages in a second on this connection; "
                "this one was not read",
            )
        )

    # --- requests ----------------------------------------------------------------------

    def _on_hello(self, request: Hello) -> None:
        servers = [{k: v for k, v in asdict(s).items() if v is not None} for s in self._ice_servers]
        for server in servers:
            server["urls"] = list(server["urls"])
        user = self.grant.user if self.grant is not None else None
        self.send(Welcome(PROTOCOL_VERSION, self.id, servers, id=request.id, user=user))

    def _on_call(self, request: Call) -> None:
        try:
            self._manager.place(
                self,
                request.call,
                request.to,
                request.sdp,
                request.id,
                grant=self.grant,
                address=self._peer,
                headers=request.headers,
            )
        except Refused as refused:
            raise ProtocolError(
                refused.refusal.error,
                refused.message,
                id=request.id,
                call=request.call,
                refusal=refused.refusal.label,
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
                self,
                request.user,
                request.password,
                request.display_name,
                request.id,
                subject=self.grant.user if self.grant is not None else None,
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

    def _on_candidate(self, request: Candidate) -> None:
        with _call_errors("candidate", request.call, request.id, "is ending"):
            self._manager.candidate(
                self,
                request.call,
                request.candidate,
                request.sdp_mid,
                request.sdp_mline_index,
                request.id,
            )

    def _on_dtmf(self, request: Dtmf) -> None:
        self._control("dtmf", request.call, request.id, request.digits, request.method)

    def _on_hold(self, request: Hold) -> None:
        self._control("hold", request.call, request.id)

    def _on_unhold(self, request: Unhold) -> None:
        self._control("unhold", request.call, request.id)

    def _on_transfer(self, request: Transfer) -> None:
        with _call_errors("transfer", request.call, request.id, "is not answered (or is ending)"):
            self._manager.transfer(
                self, request.call, request.to, request.replaces, request.id, grant=self.grant
            )

    def _on_transfer_accept(self, request: TransferAccept) -> None:
        with _call_errors("transfer_accept", request.call, request.id, "is ending"):
            try:
                self._manager.accept_transfer(
                    self,
                    request.call,
                    request.new_call,
                    request.sdp,
                    request.id,
                    self.grant,
                    self._peer,
                )
            except Refused as refused:  # about the new call
                raise ProtocolError(
                    refused.refusal.error,
                    refused.message,
                    id=request.id,
                    call=request.new_call,
                    refusal=refused.refusal.label,
                ) from None

    def _on_transfer_reject(self, request: TransferReject) -> None:
        with _call_errors("transfer_reject", request.call, request.id, "is ending"):
            self._manager.reject_transfer(self, request.call)

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

    def call_transfer(
        self, call_id: str, code: int, reason: str, final: bool, request_id: str | None
    ) -> None:
        self.send(TransferEvent(call_id, code, reason, final, request_id))

    def call_transfer_request(self, call_id: str, to: str) -> None:
        self.send(TransferRequest(call_id, to))

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
        self.send(Error(refusal.error, message, request_id, call_id, refusal.label))


@contextlib.contextmanager
def _call_errors(
    action: str, call_id: str, request_id: str | None, wrong_state: str
) -> Iterator[None]:
    """Turn the call manager's refusals of a request about ``call_id`` into errors."""
    try:
        yield
    except UnknownCall as exc:
        missing = exc.args[0] if exc.args else call_id
        raise ProtocolError(
            "not_found",
            f"{action}: no call {missing!r} on this connection",
            id=request_id,
            call=call_id,
        ) from None
    except (NotAnswered, AlreadyEnding) as exc:
        which = exc.args[0] if exc.args else call_id
        raise ProtocolError(
            "wrong_state", f"{action}: call {which!r} {wrong_state}", id=request_id, call=call_id
        ) from None
    except NoTransferRequest:
        raise ProtocolError(
            "wrong_state",
            f"{action}: the far end of call {call_id!r} asked for no transfer",
            id=request_id,
            call=call_id,
        ) from None
    except TransferUnavailable as exc:
        raise ProtocolError("unavailable", str(exc), id=request_id, call=call_id) from None
    except Refused as refused:
        raise ProtocolError(
            refused.refusal.error, refused.message, id=request_id, call=call_id
        ) from None


def websocket_handler(
    manager_key: web.AppKey[CallManager[Any]],
    metrics_key: web.AppKey[Metrics],
    ice_servers: tuple[IceServer, ...],
    max_message_bytes: int,
    sessions_key: web.AppKey[set[Session]],
    heartbeat: float = 15.0,
    *,
    verifier: TokenVerifier | None = None,
    origins: OriginPolicy | None = None,
    per_address: ConnectionCounter | None = None,
    max_messages_per_second: int = 0,
    client_address: ClientAddress | None = None,
) -> Callable[[web.Request], Awaitable[web.WebSocketResponse]]:
    """Build the ``/ws`` handler for an app.

    Before the upgrade, a request from an origin ``origins`` does not allow gets
    403, and one from an address that has ``per_address``'s limit of sockets open
    gets 429: no WebSocket exists for either.
    """

    async def handle(request: web.Request) -> web.WebSocketResponse:
        app = request.app
        metrics = app[metrics_key]
        peer = (
            client_address.of(request.remote, request.headers.get(hdrs.X_FORWARDED_FOR))
            if client_address is not None
            else request.remote or ""
        )
        origin = request.headers.get(hdrs.ORIGIN)
        if origins is not None and not origins.allows(origin, request.headers.get(hdrs.HOST)):
            metrics.websockets_refused.labels("origin").inc()
            _log_refusal(
                "WebSocket from %s refused: origin %s is not allowed",
                peer,
                "(none)" if origin is None else repr(origin[:100]),
            )
            raise web.HTTPForbidden(text="origin not allowed\n")
        if per_address is not None and not per_address.acquire(peer):
            metrics.websockets_refused.labels("address_limit").inc()
            _log_refusal(
                "WebSocket from %s refused: %d connections open from there",
                peer,
                per_address.limit,
            )
            raise web.HTTPTooManyRequests(text="too many connections from this address\n")
        try:
            # A ping every ``heartbeat`` seconds; aiohttp closes the connection when
            # its pong is missing half an interval later, and the session's calls end.
            ws = web.WebSocketResponse(
                heartbeat=heartbeat, max_msg_size=max_message_bytes * HARD_LIMIT_FACTOR
            )
            await ws.prepare(request)
            sessions = app[sessions_key]
            session = Session(
                ws,
                app[manager_key],
                ice_servers,
                max_message_bytes,
                request.transport,
                verifier=verifier,
                max_messages_per_second=max_messages_per_second,
                metrics=metrics,
                peer=peer,
            )
            sessions.add(session)
            metrics.websockets_active.set(len(sessions))
            try:
                await session.run()
            finally:
                sessions.discard(session)
                metrics.websockets_active.set(len(sessions))
        finally:
            if per_address is not None:
                per_address.release(peer)
        return ws

    return handle
