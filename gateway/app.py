"""Build the front process's aiohttp application.

Each long-lived resource has its own cleanup context, started in order and
stopped in reverse: the embedded targets, the worker pool, the call manager.
On shutdown every call is hung up on both legs and every WebSocket is closed
with GOING_AWAY.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import WSCloseCode, web

from gateway.calls.manager import CallManager
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.signaling.handler import websocket_handler
from gateway.sip.engine import EngineConfig
from gateway.webrtc.peer import IceServerParams
from gateway.workers.embedded import EmbeddedTargets
from gateway.workers.ipc import FromWorker
from gateway.workers.pool import WorkerHandle, WorkerPool, worker_settings
from gateway.workers.process import WorkerSettings

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
TARGETS = web.AppKey("targets", EmbeddedTargets)
POOL = web.AppKey("pool", WorkerPool)
MANAGER = web.AppKey("manager", CallManager)
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")


def ice_addresses(config: Config) -> tuple[str, ...]:
    """The ICE host addresses workers offer: configured, else loopback for a loopback front."""
    if config.webrtc.ice_addresses:
        return config.webrtc.ice_addresses
    host = config.http.host
    if host == "localhost":
        return ("127.0.0.1",)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if address.is_loopback:
        return ("::1",) if address.version == 6 else ("127.0.0.1",)
    return ()


def build_app(config: Config, log_level: int = logging.INFO) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[SOCKETS] = set()
    app.cleanup_ctx.append(_embedded_targets)
    app.cleanup_ctx.append(_workers_and_calls)
    app.on_shutdown.append(_close_sockets)
    handler = websocket_handler(
        MANAGER,
        METRICS,
        config.webrtc.ice_servers,
        config.http.max_message_bytes,
        config.http.max_calls_per_connection,
        SOCKETS,
    )
    app.router.add_get("/", _demo_page)
    app.router.add_get("/ws", handler)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _health)
    return app


async def _embedded_targets(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.embedded.enabled:
        yield
        return
    targets = await EmbeddedTargets.start(config.embedded, config.sip.log_level)
    app[TARGETS] = targets
    logger.info("embedded targets echo and tone at sip:%s", targets.address)
    yield
    await targets.stop()


async def _workers_and_calls(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    sip = config.sip
    base = WorkerSettings(
        index=0,
        engine=EngineConfig(
            bind=sip.bind,
            port=sip.port,
            rtp_port=sip.rtp_port,
            user=sip.user,
            codecs=sip.codecs,
            invite_timeout=sip.invite_timeout,
            log_level=sip.log_level,
            max_calls=config.workers.calls_per_worker,
        ),
        ice_servers=tuple(
            IceServerParams(s.urls, s.username, s.credential) for s in config.webrtc.ice_servers
        ),
        ice_addresses=ice_addresses(config),
        log_level=logging.getLogger().getEffectiveLevel(),
    )
    variables = {"embedded": app[TARGETS].address} if TARGETS in app else {}
    manager: CallManager | None = None

    # The pool and the manager refer to each other: the pool's callbacks reach
    # the manager, created right after the pool.
    def on_message(worker: WorkerHandle, message: FromWorker) -> None:
        assert manager is not None
        manager.on_worker_message(worker, message)

    def on_lost(worker: WorkerHandle) -> None:
        assert manager is not None
        manager.on_worker_lost(worker)

    pool = WorkerPool(
        worker_settings(base, config.workers.count, sip.port),
        config.workers.calls_per_worker,
        on_message,
        on_lost,
        config.workers.restart_delay,
    )
    manager = CallManager(pool, config.rules, variables, app[METRICS])
    app[POOL] = pool
    app[MANAGER] = manager
    await pool.start()
    ports = ", ".join(str(w.sip_port) for w in pool.workers)
    logger.info("%d workers ready (SIP ports %s)", len(pool.workers), ports)
    yield
    manager.end_all(503, "Gateway shutting down")
    await pool.stop()


async def _close_sockets(app: web.Application) -> None:
    if MANAGER in app:
        manager = app[MANAGER]
        manager.end_all(503, "Gateway shutting down")
        # Let the hangup events reach the browsers before their sockets close.
        for _ in range(100):
            if not manager.active:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
    sockets: set[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


async def _demo_page(request: web.Request) -> web.Response:
    page = resources.files("gateway").joinpath("static/index.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain")


async def _health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    ready = sum(1 for w in pool.workers if w.ready)
    status = 200 if ready else 503
    body = {
        "workers_ready": ready,
        "workers": len(pool.workers),
        "calls_active": request.app[MANAGER].active,
        "worker_pids": [w.process.pid if w.process else None for w in pool.workers],
    }
    return web.json_response(body, status=status)
