"""Start and stop the embedded targets process (``echo`` and ``tone``).

The process runs :mod:`gateway.targets.main`, named by module path: the front
never imports it (nor pjsua2).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from gateway.config import EmbeddedConfig
from gateway.ipc import Channel, Entry, TargetsParams, WorkerFailed, WorkerReady

from .pool import StartupError, spawn

TARGETS_ENTRY = Entry("gateway.targets.main")

#: How long the targets process may take to start.
START_TIMEOUT = 30.0


@dataclass
class EmbeddedTargets:
    """The running process and the ``host:port`` the dialplan's ``{embedded}`` stands for."""

    process: BaseProcess
    channel: Channel
    address: str

    @classmethod
    async def start(
        cls, config: EmbeddedConfig, sip_log_level: int, log_level: int = logging.INFO
    ) -> EmbeddedTargets:
        params = TargetsParams(config, sip_log_level, log_level)
        process, channel = await spawn(TARGETS_ENTRY, params, "sipgw-targets")
        try:
            message = await asyncio.wait_for(channel.recv(), START_TIMEOUT)
        except TimeoutError:
            message = None
        if isinstance(message, WorkerReady):
            host = f"[{config.bind}]" if ":" in config.bind else config.bind
            return cls(process, channel, f"{host}:{message.sip_port}")
        channel.close()
        if process.is_alive():
            process.kill()
        await asyncio.to_thread(process.join, 2.0)
        if isinstance(message, WorkerFailed):
            raise StartupError(message.message)
        raise StartupError(f"the embedded targets failed to start (exit code {process.exitcode})")

    async def stop(self) -> None:
        self.channel.send("stop")
        await asyncio.to_thread(self.process.join, 5.0)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 2.0)
        self.channel.close()
