"""A worker process: one pjsua2 Endpoint, the aiortc legs of its calls, their bridges.

Started by the front with the ``spawn`` method, by module path (a forked child
would inherit pjsua2's threads and sockets; the front never imports this
module). It reads :mod:`gateway.ipc` commands from its channel on its event
loop, dispatches each through a handler table, and exits, hanging up every
call, when told to or when the front's end of the channel closes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.census import process_census
from gateway.ipc import (
    AcceptCall,
    AddCandidate,
    CallReleased,
    Census,
    CensusReport,
    Channel,
    ControlCall,
    EndCall,
    FromWorker,
    Register,
    RegistrationChanged,
    RejectCall,
    Shutdown,
    StartCall,
    ToWorker,
    Unregister,
    WorkerFailed,
    WorkerParams,
    WorkerReady,
)
from gateway.outcomes import End, ending
from gateway.worker.call import BridgedCall
from gateway.worker.sip.engine import SipEngine, SipStartError
from gateway.worker.sip.events import SipEvent, SipIncoming, SipRegistration
from gateway.worker.webrtc.peer import (
    open_peer_connections,
    restrict_host_addresses,
    set_consent_timeout,
)

logger = logging.getLogger(__name__)

#: How long shutdown waits for calls to release after hanging them up, in seconds.
SHUTDOWN_GRACE = 2.0
#: After a SIGTERM, how long the worker waits for the front's Shutdown before it
#: stops on its own (systemd signals the whole process group at once).
TERM_GRACE = 10.0


def run(sock: socket.socket, params: WorkerParams) -> None:
    """Process entry point."""
    logging.basicConfig(
        level=params.log_level,
        format=f"%(asctime)s worker-{params.index} %(levelname)s %(name)s: %(message)s",
    )
    # The front decides when workers stop; a Ctrl-C in the terminal reaches the
    # whole process group, so let the front handle it and tell us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if params.ice_addresses:
        restrict_host_addresses(params.ice_addresses)
    set_consent_timeout(params.consent_timeout)
    asyncio.run(Worker(sock, params).run())


async def _start_threads(executor: ThreadPoolExecutor, count: int) -> None:
    """Make ``executor`` start ``count`` threads: each holds a task until all are up."""
    barrier = threading.Barrier(count, timeout=5.0)
    loop = asyncio.get_running_loop()
    waits = [loop.run_in_executor(executor, barrier.wait) for _ in range(count)]
    await asyncio.gather(*waits, return_exceptions=True)


class Worker:
    """The asyncio side of a worker process."""

    def __init__(self, sock: socket.socket, params: WorkerParams) -> None:
        self._sock = sock
        self._params = params
        self._channel: Channel | None = None
        self._calls: dict[int, BridgedCall] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._engine: SipEngine | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._handlers: dict[type[ToWorker], Callable[[Any], None]] = {
            StartCall: self._on_start_call,
            EndCall: self._on_end_call,
            ControlCall: self._on_control_call,
            AddCandidate: self._on_add_candidate,
            Register: self._on_register,
            Unregister: self._on_unregister,
            AcceptCall: self._on_accept_call,
            RejectCall: self._on_reject_call,
            Census: self._on_census,
        }
        addresses = params.ice_addresses
        self._loopback_only = bool(addresses) and all(
            ipaddress.ip_address(a).is_loopback for a in addresses
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._channel = await Channel.open(self._sock)
        # aiortc encodes every outgoing frame in the loop's default executor, so
        # that pool is on the audio path: one thread per call slot, named, all
        # started now (none is started mid-call, and the thread count is fixed).
        self._executor = ThreadPoolExecutor(
            max_workers=self._params.max_calls, thread_name_prefix="encode"
        )
        loop.set_default_executor(self._executor)
        await _start_threads(self._executor, self._params.max_calls)
        self._engine = SipEngine(self._params, loop, self._on_sip)
        try:
            port = await self._engine.start()
        except SipStartError as exc:
            self._send(WorkerFailed(str(exc)))
            await self._channel.drain()
            self._channel.close()
            return
        # A process-group SIGTERM (systemd) reaches the workers with the front: let
        # the front hang up and tell us, and stop alone only if it never does.
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self._send(WorkerReady(port))
        tls = f", TLS on port {self._engine.tls_port}" if self._engine.tls_port else ""
        logger.info(
            "worker %s ready, SIP on port %s%s (pid %s)", self._params.index, port, tls, os.getpid()
        )
        try:
            while True:
                message = await self._channel.recv()
                if message is None or isinstance(message, Shutdown):
                    break
                self._handlers[type(message)](message)
        finally:
            await self._shutdown()

    def _on_sigterm(self) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(TERM_GRACE, self._stop_alone)

    def _stop_alone(self) -> None:
        logger.warning("no word from the front %s s after SIGTERM; stopping", TERM_GRACE)
        if self._channel is not None:
            self._channel.close()  # the command loop reads end of file and shuts down

    def _on_start_call(self, message: StartCall) -> None:
        assert self._engine is not None
        call = BridgedCall(
            message.key, self._engine, self._params, self._send, self._forget, self._loopback_only
        )
        self._calls[message.key] = call
        self._idle.clear()
        call.max_duration = message.max_duration
        call.headers = message.headers
        self._spawn(call.start(message.offer_sdp, message.uri, message.account, message.local))

    def _on_end_call(self, message: EndCall) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            call.hangup(message.ending)

    def _on_control_call(self, message: ControlCall) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            call.control(message)

    def _on_add_candidate(self, message: AddCandidate) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            call.add_candidate(message)

    def _on_census(self, message: Census) -> None:
        counts = {
            **process_census(),
            "calls": len(self._calls),
            "peer_connections": open_peer_connections(),
            "pjsua_calls": self._engine.pjsua_calls if self._engine is not None else 0,
        }
        self._send(CensusReport(message.seq, counts))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("call task failed", exc_info=task.exception())

    def _on_register(self, message: Register) -> None:
        assert self._engine is not None
        self._engine.register(
            message.reg, message.user, message.password, message.auth_user, message.display_name
        )

    def _on_unregister(self, message: Unregister) -> None:
        assert self._engine is not None
        self._engine.unregister(message.reg)

    def _on_accept_call(self, message: AcceptCall) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            self._spawn(call.accept(message.answer_sdp))

    def _on_reject_call(self, message: RejectCall) -> None:
        call = self._calls.get(message.key)
        if call is not None:
            call.reject(message.code)

    def _on_sip(self, event: SipEvent) -> None:
        if isinstance(event, SipRegistration):
            self._send(
                RegistrationChanged(
                    event.reg, event.active, event.code, event.reason, event.expires
                )
            )
        elif isinstance(event, SipIncoming):
            self._on_incoming(event)
        else:
            call = self._calls.get(event.key)
            if call is not None:
                call.on_sip(event)

    def _on_incoming(self, event: SipIncoming) -> None:
        assert self._engine is not None
        call = BridgedCall(
            event.key, self._engine, self._params, self._send, self._forget, self._loopback_only
        )
        self._calls[event.key] = call
        self._idle.clear()
        self._spawn(call.start_incoming(event))

    def _forget(self, key: int) -> None:
        self._calls.pop(key, None)
        if not self._calls:
            self._idle.set()

    def _send(self, message: FromWorker) -> None:
        if self._channel is not None:
            self._channel.send(message)  # False: the front is gone; we are stopping

    async def _shutdown(self) -> None:
        shutdown = ending(End.SHUTDOWN)
        for call in list(self._calls.values()):
            call.hangup(shutdown)
        # Give BYEs/CANCELs a moment to leave, then stop the SIP stack for good.
        try:
            await asyncio.wait_for(self._idle.wait(), SHUTDOWN_GRACE)
        except TimeoutError:
            pass
        for task in list(self._tasks):
            task.cancel()
        if self._engine is not None:
            await self._engine.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for key in list(self._calls):  # every call has reported its end by now
            self._send(CallReleased(key))
        if self._channel is not None:
            await self._channel.drain()
            self._channel.close()
