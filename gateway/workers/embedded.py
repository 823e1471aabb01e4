"""Start and stop the embedded targets process (``echo`` and ``tone``)."""

from __future__ import annotations

import asyncio
import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from gateway.config import EmbeddedConfig
from gateway.sip.targets import run_targets

_SPAWN = multiprocessing.get_context("spawn")


@dataclass
class EmbeddedTargets:
    """The running process and the ``host:port`` the dialplan's ``{embedded}`` stands for."""

    process: BaseProcess
    conn: Connection
    address: str

    @classmethod
    async def start(cls, config: EmbeddedConfig, log_level: int) -> EmbeddedTargets:
        parent, child = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=run_targets,
            args=(child, config.bind, config.port, config.rtp_port, config.tone_hz, log_level),
            name="sipgw-targets",
            daemon=True,
        )
        await asyncio.to_thread(process.start)
        child.close()
        ready = await asyncio.to_thread(parent.poll, 30.0)
        if not ready:
            process.kill()
            raise RuntimeError("the embedded targets did not start within 30 s")
        try:
            port = parent.recv()
        except EOFError:
            raise RuntimeError(
                f"the embedded targets failed to start (exit code {process.exitcode}); "
                f"is {config.bind}:{config.port} free?"
            ) from None
        host = f"[{config.bind}]" if ":" in config.bind else config.bind
        return cls(process, parent, f"{host}:{port}")

    async def stop(self) -> None:
        try:
            self.conn.send("stop")
        except (OSError, ValueError):
            pass
        await asyncio.to_thread(self.process.join, 5.0)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 2.0)
        self.conn.close()
