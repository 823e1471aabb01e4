"""Start, supervise and share out the embedded targets processes (``echo`` and ``tone``).

pjsua answers at most ``EMBEDDED_CALLS_PER_PROCESS`` (4) calls per process (its
compile-time ``PJSUA_MAX_CALLS`` in the wheel), so there are as many targets
processes as the workers need to be able to fill: ``ceil(workers.count *
calls_per_worker / 4)``, each on its own SIP port and RTP block. The dialplan's
``{embedded}`` stands, call by call, for the least loaded one (:meth:`acquire`).

They are supervised like the workers, by a :class:`~gateway.front.pool.WorkerPool`
running :mod:`gateway.targets.main` (named by module path: the front never
imports it, nor pjsua2): one that dies is restarted on the SIP port it had,
and the calls it carried are ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.config import EMBEDDED_CALLS_PER_PROCESS, Config
from gateway.ipc import Entry, FromWorker, TargetsParams
from gateway.outcomes import Refused

from .pool import WorkerHandle, WorkerPool

logger = logging.getLogger(__name__)

TARGETS_ENTRY = Entry("gateway.targets.main")

#: RTP ports each targets process may use, from ``embedded.rtp_port + 100 * index``.
RTP_PORTS_PER_PROCESS = 100

#: How long the targets processes may take to start.
START_TIMEOUT = 30.0


def targets_params(config: Config, log_level: int) -> list[TargetsParams]:
    """Process N gets SIP port ``embedded.port + N`` (0 stays 0) and the RTP ports
    ``embedded.rtp_port + 100 N`` to ``+ 99``."""
    embedded = config.embedded
    return [
        TargetsParams(
            index=i,
            embedded=embedded,
            sip_port=embedded.port + i if embedded.port else 0,
            rtp_port=embedded.rtp_port + RTP_PORTS_PER_PROCESS * i,
            max_calls=EMBEDDED_CALLS_PER_PROCESS,
            sip_log_level=config.sip.log_level,
            log_level=log_level,
        )
        for i in range(config.embedded_processes)
    ]


class EmbeddedTargets:
    """The targets processes and the ``host:port`` each call's ``{embedded}`` stands for.

    ``on_lost`` hears the keys of the calls a dead process carried.
    """

    def __init__(
        self,
        config: Config,
        on_lost: Callable[[set[int]], None],
        log_level: int = logging.INFO,
    ) -> None:
        self._bind = config.embedded.bind
        self._on_lost = on_lost
        self._assigned: dict[int, WorkerHandle] = {}
        self.pool: WorkerPool[TargetsParams] = WorkerPool(
            targets_params(config, log_level),
            self._unexpected,
            self._lost,
            config.workers.restart_delay,
            entry=TARGETS_ENTRY,
            kind="targets",
            pin_ports=True,
        )

    async def start(self) -> None:
        """Start every process; raises :class:`~gateway.front.pool.StartupError` if one cannot."""
        await self.pool.start(START_TIMEOUT)

    async def stop(self) -> None:
        await self.pool.stop()

    @property
    def processes(self) -> list[WorkerHandle]:
        return self.pool.workers

    def address(self, process: WorkerHandle) -> str:
        host = f"[{self._bind}]" if ":" in self._bind else self._bind
        return f"{host}:{process.sip_port}"

    @property
    def addresses(self) -> list[str]:
        return [self.address(p) for p in self.processes]

    # --- what the call manager uses ----------------------------------------------------

    def acquire(self, key: int) -> str:
        """The address of the least loaded ready process, holding a slot for call ``key``.

        When none has a free slot (all busy, or restarting), the least loaded one
        all the same: a busy one answers 486, and a restarting one (same port)
        answers the INVITE's retransmissions once it is up.
        """
        try:
            process = self.pool.acquire(key)
        except Refused:
            process = min(self.processes, key=lambda p: (len(p.slots), p.index))
            process.slots.add(key)
        self._assigned[key] = process
        return self.address(process)

    def release(self, key: int) -> None:
        process = self._assigned.pop(key, None)
        if process is not None:
            self.pool.release(process, key)

    # --- the pool's callbacks -------------------------------------------------------------

    def _unexpected(self, process: WorkerHandle, message: FromWorker) -> None:
        logger.warning("targets %s sent an unexpected %r", process.index, message)

    def _lost(self, process: WorkerHandle) -> None:
        keys = {k for k, p in self._assigned.items() if p is process}
        for key in keys:
            del self._assigned[key]
        self._on_lost(keys)

    def health(self) -> dict[str, Any]:
        return {
            "targets_ready": sum(1 for p in self.processes if p.ready),
            "targets": len(self.processes),
        }
