"""A worker process: one pjsua2 Endpoint, the aiortc legs of its calls, their bridges.

Started by the front with the ``spawn`` method (a forked child would inherit
pjsua2's threads and sockets), it imports pjsua2 and aiortc itself. It reads
:mod:`gateway.workers.ipc` commands from its pipe on a reader thread, runs
calls on its own event loop, and exits, hanging up every call, when told to or
when the front's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from gateway.calls.bridged import BridgedCall
from gateway.sip.engine import EngineConfig, SipEngine
from gateway.sip.events import SipEvent
from gateway.webrtc.peer import IceServerParams, restrict_host_addresses
from gateway.workers.ipc import (
    CallEnded,
    CallReleased,
    EndCall,
    FromWorker,
    Shutdown,
    StartCall,
    ToWorker,
    WorkerReady,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs, picklable for the ``spawn`` start method."""

    index: int
    engine: EngineConfig
    ice_servers: tuple[IceServerParams, ...] = ()
    ice_addresses: tuple[str, ...] = ()
    log_level: int = logging.INFO


def run_worker(conn: Connection, settings: WorkerSettings) -> None:
    """Process entry point."""
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s worker-{settings.index} %(levelname)s %(name)s: %(message)s",
    )
    # The front decides when workers stop; a Ctrl-C in the terminal reaches the
    # whole process group, so let the front handle it and tell us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if settings.ice_addresses:
        restrict_host_addresses(settings.ice_addresses)
    try:
        asyncio.run(Worker(conn, settings).run())
    finally:
        conn.close()


class Worker:
    """The asyncio side of a worker process."""

    def __init__(self, conn: Connection, settings: WorkerSettings) -> None:
        self._conn = conn
        self._settings = settings
        self._calls: dict[int, BridgedCall] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbox: asyncio.Queue[ToWorker | None] = asyncio.Queue()
        self._engine: SipEngine | None = None
        self._executor: ThreadPoolExecutor | None = None
        addresses = settings.ice_addresses
        self._loopback_only = bool(addresses) and all(
            ipaddress.ip_address(a).is_loopback for a in addresses
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # aiortc encodes every outgoing frame in the loop's default executor, so
        # that pool is on the audio path: one thread per call slot, named.
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.engine.max_calls, thread_name_prefix="encode"
        )
        loop.set_default_executor(self._executor)
        self._engine = SipEngine(self._settings.engine, loop, self._on_sip)
        port = await self._engine.start()
        threading.Thread(
            target=self._read_pipe, args=(loop,), name="ipc-reader", daemon=True
        ).start()
        self._send(WorkerReady(port))
        logger.info(
            "worker %s ready, SIP on port %s (pid %s)", self._settings.index, port, os.getpid()
        )
        try:
            while True:
                message = await self._inbox.get()
                if message is None or isinstance(message, Shutdown):
                    break
                self._dispatch(message)
        finally:
            await self._shutdown()

    def _read_pipe(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = None
            try:
                loop.call_soon_threadsafe(self._inbox.put_nowait, message)
            except RuntimeError:
                return
            if message is None:
                return

    def _dispatch(self, message: ToWorker) -> None:
        if isinstance(message, StartCall):
            assert self._engine is not None
            call = BridgedCall(
                message.key,
                self._engine,
                self._settings.ice_servers,
                self._send,
                self._forget,
                self._loopback_only,
            )
            self._calls[message.key] = call
            self._spawn(call.start(message.offer_sdp, message.uri))
        elif isinstance(message, EndCall):
            existing = self._calls.get(message.key)
            if existing is not None:
                existing.hangup(message.code, message.reason, message.by)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("call task failed", exc_info=task.exception())

    def _on_sip(self, event: SipEvent) -> None:
        call = self._calls.get(event.key)
        if call is not None:
            call.on_sip(event)

    def _forget(self, key: int) -> None:
        self._calls.pop(key, None)

    def _send(self, message: FromWorker) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            pass  # the front is gone; we are shutting down

    async def _shutdown(self) -> None:
        for call in list(self._calls.values()):
            call.hangup(503, "Gateway shutting down", "gateway")
        # Give BYEs/CANCELs a moment to leave, then stop the SIP stack for good.
        for _ in range(100):
            if not self._calls:
                break
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        if self._engine is not None:
            await self._engine.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for key in list(self._calls):
            self._send(CallEnded(key, 503, "Gateway shutting down", "gateway"))
            self._send(CallReleased(key))
