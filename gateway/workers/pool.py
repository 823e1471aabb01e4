"""The front's pool of worker processes: spawn, watch, assign calls, restart.

Each worker is a ``spawn``-started process with a pipe. A reader thread per
worker turns its messages into calls on the front's event loop; end of file on
the pipe means the worker died, which the owner hears about through
``on_lost`` (its calls end) before the worker is started again.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .ipc import CallReleased, FromWorker, Shutdown, ToWorker, WorkerReady
from .process import WorkerSettings, run_worker

logger = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


@dataclass(eq=False)
class WorkerHandle:
    """The front's view of one worker process."""

    index: int
    capacity: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    sip_port: int = 0
    ready: bool = False
    #: Calls holding a slot, from StartCall until CallReleased.
    slots: set[int] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots) if self.ready else 0


class WorkerPool:
    """Starts ``count`` workers and keeps them running."""

    def __init__(
        self,
        settings: list[WorkerSettings],
        capacity: int,
        on_message: Callable[[WorkerHandle, FromWorker], None],
        on_lost: Callable[[WorkerHandle], None],
        restart_delay: float = 1.0,
    ) -> None:
        self._settings = settings
        self._on_message = on_message
        self._on_lost = on_lost
        self._restart_delay = restart_delay
        self.workers = [WorkerHandle(s.index, capacity) for s in settings]
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, timeout: float = 60.0) -> None:
        """Start every worker and wait until each reports ready."""
        self._loop = asyncio.get_running_loop()
        await asyncio.wait_for(
            asyncio.gather(*(self._start_worker(w) for w in self.workers)), timeout
        )

    async def _start_worker(self, worker: WorkerHandle) -> None:
        assert self._loop is not None
        settings = self._settings[worker.index]
        parent, child = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=run_worker,
            args=(child, settings),
            name=f"sipgw-worker-{worker.index}",
            daemon=True,
        )
        ready = self._loop.create_future()
        self._ready[worker.index] = ready
        await asyncio.to_thread(process.start)
        child.close()
        worker.process, worker.conn, worker.ready = process, parent, False
        worker.slots.clear()
        threading.Thread(
            target=self._read,
            args=(worker, parent),
            name=f"worker-{worker.index}-reader",
            daemon=True,
        ).start()
        await ready

    def _read(self, worker: WorkerHandle, conn: Connection) -> None:
        assert self._loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._loop.call_soon_threadsafe(self._deliver, worker, conn, message)
            except RuntimeError:
                return
        try:
            self._loop.call_soon_threadsafe(self._lost, worker, conn)
        except RuntimeError:
            pass

    def _deliver(self, worker: WorkerHandle, conn: Connection, message: FromWorker) -> None:
        if worker.conn is not conn:
            return  # from a previous incarnation
        if isinstance(message, WorkerReady):
            worker.sip_port = message.sip_port
            worker.ready = True
            ready = self._ready.get(worker.index)
            if ready is not None and not ready.done():
                ready.set_result(None)
            return
        if isinstance(message, CallReleased):
            worker.slots.discard(message.key)
        self._on_message(worker, message)

    def _lost(self, worker: WorkerHandle, conn: Connection) -> None:
        if worker.conn is not conn:
            return
        worker.ready = False
        ready = self._ready.get(worker.index)
        if ready is not None and not ready.done():
            ready.set_exception(RuntimeError(f"worker {worker.index} exited during start-up"))
        if self._closing:
            return
        self._on_lost(worker)
        worker.slots.clear()
        conn.close()
        task = asyncio.ensure_future(self._restart(worker, worker.process))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: WorkerHandle, dead: BaseProcess | None) -> None:
        code = None
        if dead is not None:  # reap it off the event loop, for its exit code
            await asyncio.to_thread(dead.join, 5.0)
            code = dead.exitcode
        logger.error("worker %s died (exit code %s); restarting", worker.index, code)
        delay = self._restart_delay
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._start_worker(worker)
                logger.info("worker %s restarted", worker.index)
                return
            except Exception:
                logger.exception("worker %s failed to restart", worker.index)
                delay = min(delay * 2, 30.0)

    def acquire(self, key: int) -> WorkerHandle | None:
        """Reserve a call slot on the least loaded ready worker, or ``None`` if all are full."""
        candidates = [w for w in self.workers if w.free > 0]
        if not candidates:
            return None
        worker = max(candidates, key=lambda w: (w.free, -w.index))
        worker.slots.add(key)
        return worker

    def send(self, worker: WorkerHandle, message: ToWorker) -> bool:
        """Send a command; ``False`` when the worker is gone (its loss is reported apart)."""
        if worker.conn is None or not worker.ready:
            return False
        try:
            worker.conn.send(message)
        except (OSError, ValueError):
            return False
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask every worker to hang up and exit; kill those that do not."""
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        for worker in self.workers:
            if worker.conn is not None:
                try:
                    worker.conn.send(Shutdown())
                except (OSError, ValueError):
                    pass
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            await asyncio.to_thread(process.join, timeout)
            if process.is_alive():
                logger.warning("worker %s did not exit; killing it", worker.index)
                process.kill()
                await asyncio.to_thread(process.join, 2.0)
            if worker.conn is not None:
                worker.conn.close()
            worker.ready = False


def worker_settings(base: WorkerSettings, count: int, port: int) -> list[WorkerSettings]:
    """One settings object per worker: worker N gets SIP port ``port + N`` (0 stays 0)
    and the RTP ports ``rtp_port + 100 N`` to ``+ 99``."""
    return [
        replace(
            base,
            index=i,
            engine=replace(
                base.engine,
                port=port + i if port else 0,
                rtp_port=base.engine.rtp_port + 100 * i,
                rtp_port_range=100,
            ),
        )
        for i in range(count)
    ]
