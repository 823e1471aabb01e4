"""The front's pool of worker processes: spawn, watch, assign call slots, restart.

Each worker is a ``spawn``-started process, named by module path so that the
front never imports its code, joined to the front by a :class:`~gateway.ipc.Channel`
read by one task on the event loop. End of file on the channel means the worker
died, which the owner hears about through ``on_lost`` (its calls end) before the
worker is started again. The embedded targets processes are supervised by the
same pool class, started from another entry point and restarted on the SIP port
they first bound (``pin_ports``), so that the address the dialplan gave out stays
valid.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import multiprocessing
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Protocol, Self, TypeVar

from gateway.config import Config
from gateway.front.sip_peers import worker_trusted_peers
from gateway.ipc import (
    Census,
    CensusReport,
    Channel,
    Entry,
    FromWorker,
    Shutdown,
    ToTargets,
    ToWorker,
    WorkerFailed,
    WorkerParams,
    WorkerReady,
)
from gateway.limits import SlidingWindow
from gateway.outcomes import Refusal, Refused

logger = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")

#: The worker's entry point, by module path.
WORKER_ENTRY = Entry("gateway.worker.main")

#: RTP ports each worker may use, from ``sip.rtp_port + 100 * index``.
RTP_PORTS_PER_WORKER = 100


class StartupError(RuntimeError):
    """A child process could not start; the message is meant for the operator."""


def ice_addresses(config: Config) -> tuple[str, ...]:
    """The ICE host addresses workers offer: configured, else loopback for a loopback front."""
    if config.webrtc.ice_addresses:
        return config.webrtc.ice_addresses
    host = config.http.host
    if host == "localhost":
        return ("127.0.0.1",)
    address = ipaddress.ip_address(host)
    if address.is_loopback:
        return ("::1",) if address.version == 6 else ("127.0.0.1",)
    return ()


def worker_params(config: Config, log_level: int) -> list[WorkerParams]:
    """One parameter set per worker: worker N gets SIP port ``sip.port + N`` (0 stays 0)
    and the RTP ports ``sip.rtp_port + 100 N`` to ``+ 99``."""
    sip = config.sip
    peers = worker_trusted_peers(config)
    return [
        WorkerParams(
            index=i,
            sip=sip,
            sip_port=sip.port + i if sip.port else 0,
            tls_port=sip.tls_port + i if sip.tls_port else 0,
            rtp_port=sip.rtp_port + RTP_PORTS_PER_WORKER * i,
            rtp_port_range=RTP_PORTS_PER_WORKER,
            max_calls=config.workers.calls_per_worker,
            calls=config.calls,
            registrar=config.registrar,
            ice_servers=config.webrtc.ice_servers,
            ice_addresses=ice_addresses(config),
            consent_timeout=config.webrtc.consent_timeout,
            log_level=log_level,
            trusted_peers=peers,
        )
        for i in range(config.workers.count)
    ]


@dataclass(eq=False)
class WorkerHandle:
    """The front's view of one worker process."""

    index: int
    capacity: int
    process: BaseProcess | None = None
    channel: Channel | None = None
    sip_port: int = 0
    ready: bool = False
    #: Calls holding a slot, from StartCall until CallReleased.
    slots: set[int] = field(default_factory=set)
    reader: asyncio.Task[None] | None = None
    #: Calls started in the last second (set-up pacing).
    setups: SlidingWindow = field(default_factory=lambda: SlidingWindow(20, 1.0))

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots) if self.ready else 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


async def spawn(entry: Entry, params: Any, name: str) -> tuple[BaseProcess, Channel]:
    """Start ``entry(sock, params)`` in a ``spawn``-ed process joined by a channel."""
    ours, theirs = socket.socketpair()
    process = _SPAWN.Process(target=entry, args=(theirs, params), name=name, daemon=True)
    try:
        await asyncio.to_thread(process.start)
    finally:
        theirs.close()
    return process, await Channel.open(ours)


class ChildParams(Protocol):
    """What the pool needs to know of a child's start parameters."""

    @property
    def index(self) -> int: ...

    @property
    def sip_port(self) -> int: ...

    @property
    def max_calls(self) -> int: ...

    def with_sip_port(self, port: int) -> Self: ...


P = TypeVar("P", bound=ChildParams)


class WorkerPool(Generic[P]):
    """Starts one child process per parameter set and keeps them running.

    ``entry`` is what the children run (the gateway worker by default) and
    ``kind`` names them in logs and process names. With ``pin_ports`` a child
    configured for any free SIP port (0) is restarted on the port it bound first.
    """

    def __init__(
        self,
        params: Sequence[P],
        on_message: Callable[[WorkerHandle, FromWorker], None],
        on_lost: Callable[[WorkerHandle], None],
        restart_delay: float = 1.0,
        max_setups_per_second: int = 20,
        *,
        entry: Entry = WORKER_ENTRY,
        kind: str = "worker",
        pin_ports: bool = False,
    ) -> None:
        self._params = list(params)
        self._on_message = on_message
        self._on_lost = on_lost
        self._restart_delay = restart_delay
        self._entry = entry
        self.kind = kind
        self._pin_ports = pin_ports
        self.workers = [
            WorkerHandle(p.index, p.max_calls, setups=SlidingWindow(max_setups_per_second, 1.0))
            for p in params
        ]
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._census_seq = itertools.count(1)
        self._censuses: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def start(self, timeout: float = 60.0) -> None:
        """Start every worker and wait until each reports ready.

        Raises :class:`StartupError` (after stopping what did start) if one cannot.
        """
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._start_worker(w) for w in self.workers)), timeout
            )
        except BaseException:
            await self.stop()
            raise

    async def _start_worker(self, worker: WorkerHandle) -> None:
        ready = asyncio.get_running_loop().create_future()
        self._ready[worker.index] = ready
        process, channel = await spawn(
            self._entry, self._params[worker.index], f"sipgw-{self.kind}-{worker.index}"
        )
        worker.process, worker.channel, worker.ready = process, channel, False
        # Operators (and the tests) find a child's pid here: /healthz does not show it.
        logger.info("%s %s started (pid %s)", self.kind, worker.index, worker.pid)
        worker.slots.clear()
        worker.reader = asyncio.create_task(
            self._read(worker, channel), name=f"worker-{worker.index}-reader"
        )
        await ready

    async def _read(self, worker: WorkerHandle, channel: Channel) -> None:
        while (message := await channel.recv()) is not None:
            if isinstance(message, WorkerReady):
                worker.sip_port = message.sip_port
                worker.ready = True
                params = self._params[worker.index]
                if self._pin_ports and params.sip_port == 0:
                    self._params[worker.index] = params.with_sip_port(message.sip_port)
                self._settle(worker, None)
            elif isinstance(message, WorkerFailed):
                self._settle(worker, StartupError(message.message))
            elif isinstance(message, CensusReport):
                self._census_report(message)
            else:
                self._on_message(worker, message)
        channel.close()
        self._lost(worker, channel)

    def _settle(self, worker: WorkerHandle, error: BaseException | None) -> None:
        ready = self._ready.get(worker.index)
        if ready is None or ready.done():
            return
        if error is None:
            ready.set_result(None)
        else:
            ready.set_exception(error)

    def _lost(self, worker: WorkerHandle, channel: Channel) -> None:
        if worker.channel is not channel:
            return
        was_ready, worker.ready = worker.ready, False
        code = worker.process.exitcode if worker.process is not None else None
        self._settle(
            worker,
            StartupError(f"{self.kind} {worker.index} exited during start-up (exit code {code})"),
        )
        if self._closing or not was_ready:
            return
        self._on_lost(worker)
        worker.slots.clear()
        task = asyncio.create_task(self._restart(worker, worker.process))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: WorkerHandle, dead: BaseProcess | None) -> None:
        code = None
        if dead is not None:  # reap it off the event loop, for its exit code
            await asyncio.to_thread(dead.join, 5.0)
            code = dead.exitcode
        logger.error("%s %s died (exit code %s); restarting", self.kind, worker.index, code)
        delay = self._restart_delay
        while not self._closing:
            await asyncio.sleep(delay)  # back off, so a crash loop does not spin
            try:
                await self._start_worker(worker)
                logger.info("%s %s restarted (pid %s)", self.kind, worker.index, worker.pid)
                return
            except Exception as exc:
                logger.error("%s %s failed to restart: %s", self.kind, worker.index, exc)
                delay = min(delay * 2, 30.0)

    # --- what the call manager uses ------------------------------------------------------

    def acquire(
        self, key: int, only: WorkerHandle | None = None, prefer: WorkerHandle | None = None
    ) -> WorkerHandle:
        """Reserve a call slot on the least loaded ready worker that may start a call now.

        ``only``: that worker or none (a registered user's calls use its account there).
        ``prefer``: that worker if it may take the call (a connection's other calls are there).
        Raises :class:`~gateway.outcomes.Refused` when no worker is ready, all are
        full, or those with room have started their quota of calls this second.
        """
        if not any(w.ready for w in self.workers):
            raise Refused(Refusal.NO_WORKER, "no gateway worker is running; try again shortly")
        candidates = [w for w in self.workers if w.free > 0 and only in (None, w)]
        if not candidates:
            raise Refused(Refusal.NO_CAPACITY, "every gateway worker is at its call limit")
        paced = [w for w in candidates if not w.setups.full()]
        if not paced:
            raise Refused(
                Refusal.SETUP_RATE, "the gateway is starting calls as fast as it may; try again"
            )
        worker = prefer if prefer in paced else max(paced, key=lambda w: (w.free, -w.index))
        assert worker is not None
        worker.setups.add()
        worker.slots.add(key)
        return worker

    def release(self, worker: WorkerHandle, key: int) -> None:
        worker.slots.discard(key)

    def claim(self, worker: WorkerHandle, key: int) -> None:
        worker.slots.add(key)

    @property
    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers)

    def send(self, worker: WorkerHandle, message: ToWorker | ToTargets) -> bool:
        """Send a command; ``False`` when the worker is gone (its loss is reported apart)."""
        if worker.channel is None or not worker.ready:
            return False
        return worker.channel.send(message)

    async def census(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Every child's own census (:mod:`gateway.census`), asked for at once.

        A child that does not answer within ``timeout`` is ``{"index", "pid", "error"}``.
        """
        return list(await asyncio.gather(*(self._census(w, timeout) for w in self.workers)))

    async def _census(self, worker: WorkerHandle, timeout: float) -> dict[str, Any]:
        seq = next(self._census_seq)
        reply = self._censuses[seq] = asyncio.get_running_loop().create_future()
        entry: dict[str, Any] = {"index": worker.index}
        try:
            if not self.send(worker, Census(seq)):
                return {**entry, "pid": worker.pid, "error": "not ready"}
            return {**entry, **await asyncio.wait_for(reply, timeout)}
        except TimeoutError:
            return {**entry, "pid": worker.pid, "error": "no reply"}
        finally:
            del self._censuses[seq]

    def _census_report(self, report: CensusReport) -> None:
        reply = self._censuses.get(report.seq)
        if reply is not None and not reply.done():
            reply.set_result(report.counts)

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask every worker to hang up and exit; kill those that do not."""
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(Shutdown())
        await asyncio.gather(*(self._stop_worker(w, timeout) for w in self.workers))

    async def _stop_worker(self, worker: WorkerHandle, timeout: float) -> None:
        if worker.reader is not None:  # ends when the worker closes its channel
            try:
                await asyncio.wait_for(asyncio.shield(worker.reader), timeout)
            except TimeoutError:
                pass
        process = worker.process
        if process is not None:
            if process.is_alive():
                await asyncio.to_thread(process.join, 1.0)
            if process.is_alive():
                logger.warning("%s %s did not exit; killing it", self.kind, worker.index)
                process.kill()
                await asyncio.to_thread(process.join, 2.0)
        if worker.channel is not None:
            worker.channel.close()
        if worker.reader is not None:
            worker.reader.cancel()
        worker.ready = False
