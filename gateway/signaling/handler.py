"""The aiohttp WebSocket endpoint ``/ws``: one :class:`Session` per connection.

A session parses each text frame (:mod:`gateway.signaling.messages`), hands it
to a small handler, and answers any :class:`ProtocolError` with an ``error``
message while keeping the connection and its calls up. Outgoing messages go
through a bounded queue written by one task, so a slow browser cannot make
the gateway buffer without limit. When the socket closes, its calls end.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.calls.manager import CallManager, FrontCall
from gateway.config import IceServer
from gateway.metrics import Metrics

from .messages import (
    PROTOCOL_VERSION,
    Call,
    Error,
    Event,
    Hangup,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Request,
    Welcome,
    encode,
    parse,
)

logger = logging.getLogger(__name__)

#: Messages queued for one browser before the gateway gives up on it.
SEND_QUEUE = 256
#: A frame this many times over the limit closes the socket instead (aiohttp's guard).
HARD_LIMIT_FACTOR = 4


class Session:
    """The state of one WebSocket connection."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        manager: CallManager,
        ice_servers: tuple[IceServer, ...],
        max_message_bytes: int,
        max_calls: int,
    ) -> None:
        self.id = secrets.token_urlsafe(12)
        self.calls: dict[str, FrontCall] = {}
        self._used_ids: set[str] = set()
        self._ws = ws
        self._manager = manager
        self._ice_servers = ice_servers
        self._max_message_bytes = max_message_bytes
        self._max_calls = max_calls
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue(SEND_QUEUE)
        self._closers: set[asyncio.Future[bool]] = set()
        # One small handler per request type; each takes its own request class.
        self._handlers: dict[type[Request], Callable[[Any], None]] = {
            Hello: self._on_hello,
            Call: self._on_call,
            Hangup: self._on_hangup,
            Ping: self._on_ping,
        }

    def send(self, event: Event) -> None:
        """Queue a message for the browser (never blocks)."""
        try:
            self._outbox.put_nowait(encode(event))
        except asyncio.QueueFull:
            logger.warning("session %s: browser is not reading; closing", self.id)
            task = asyncio.ensure_future(
                self._ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"not reading")
            )
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def run(self) -> None:
        writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.id}")
        try:
            async for frame in self._ws:
                if frame.type == WSMsgType.TEXT:
                    self._receive(frame.data)
                elif frame.type == WSMsgType.BINARY:
                    self.send(
                        Error("bad_request", "binary frames are not supported; send JSON text")
                    )
                elif frame.type == WSMsgType.ERROR:
                    logger.info("session %s: %s", self.id, self._ws.exception())
        finally:
            self._manager.drop_owner(self)
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                pass

    async def _write(self) -> None:
        while True:
            text = await self._outbox.get()
            if text is None:
                await self._ws.close()
                return
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
            logger.exception("session %s: request failed", self.id)
            self.send(Error("internal", "the gateway failed to handle this message"))

    # --- handlers ----------------------------------------------------------------------

    def _on_hello(self, request: Hello) -> None:
        servers = [{k: v for k, v in asdict(s).items() if v is not None} for s in self._ice_servers]
        for server in servers:
            server["urls"] = list(server["urls"])
        self.send(Welcome(PROTOCOL_VERSION, self.id, servers, id=request.id))

    def _on_call(self, request: Call) -> None:
        if request.call in self._used_ids:
            raise ProtocolError(
                "wrong_state",
                f"call: id {request.call!r} is already used on this connection",
                id=request.id,
                call=request.call,
            )
        if len(self.calls) >= self._max_calls:
            raise ProtocolError(
                "busy",
                f"call: this connection already has {len(self.calls)} calls (the limit)",
                id=request.id,
                call=request.call,
            )
        self._manager.place(self, request.call, request.to, request.sdp, request.id)
        self._used_ids.add(request.call)

    def _on_hangup(self, request: Hangup) -> None:
        self._manager.hangup(self, request.call, request.id)

    def _on_ping(self, request: Ping) -> None:
        self.send(Pong(id=request.id))


def websocket_handler(
    manager_key: web.AppKey[CallManager],
    metrics_key: web.AppKey[Metrics],
    ice_servers: tuple[IceServer, ...],
    max_message_bytes: int,
    max_calls: int,
    sockets_key: web.AppKey[set[web.WebSocketResponse]],
) -> Callable[[web.Request], Awaitable[web.WebSocketResponse]]:
    """Build the ``/ws`` handler for an app."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            heartbeat=30.0, max_msg_size=max_message_bytes * HARD_LIMIT_FACTOR
        )
        await ws.prepare(request)
        app = request.app
        metrics = app[metrics_key]
        sockets = app[sockets_key]
        sockets.add(ws)
        metrics.websockets_active = len(sockets)
        session = Session(ws, app[manager_key], ice_servers, max_message_bytes, max_calls)
        try:
            await session.run()
        finally:
            sockets.discard(ws)
            metrics.websockets_active = len(sockets)
        return ws

    return handle
