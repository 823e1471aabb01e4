"""Build the front process's aiohttp application.

Each long-lived resource has its own cleanup context, started in order and
stopped in reverse: the embedded targets, then the worker pool with the call
manager. On shutdown every call is hung up on both legs, its browser is told,
and every WebSocket is closed with GOING_AWAY.

Nothing here (or below ``gateway.front``) imports pjsua2, aiortc or PyAV: the
worker and targets processes are started by module path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import WSCloseCode, hdrs, web

from gateway.census import process_census
from gateway.config import Config
from gateway.ipc import FromWorker, WorkerParams
from gateway.outcomes import End, ending

from .auth import ClientAddress, ConnectionCounter, OriginPolicy, TokenVerifier, loopback_peer
from .calls import CallManager
from .metrics import Metrics
from .orphans import Orphans, client_context
from .pool import StartupError, WorkerHandle, WorkerPool, worker_params
from .quotas import QuotaLimits
from .registrations import PJSUA_MAX_ACC, Registrations
from .signaling.session import Session, websocket_handler
from .targets import EmbeddedTargets

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
TARGETS = web.AppKey("targets", EmbeddedTargets)
POOL: web.AppKey[WorkerPool[WorkerParams]] = web.AppKey("pool")
MANAGER: web.AppKey[CallManager[WorkerHandle]] = web.AppKey("manager")
SESSIONS: web.AppKey[set[Session]] = web.AppKey("sessions")

#: How long shutdown waits for the calls' hangup events to reach the browsers.
SHUTDOWN_GRACE = 2.0
#: The ``Server`` header of every response: no library names or versions.
SERVER_HEADER = "sipgw"


async def serve(
    config: Config,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run the front until ``shutdown_trigger`` returns (default: SIGINT or SIGTERM).

    Every resource started is stopped again, also when start-up fails half-way
    (``web.run_app`` would leave the ones already started running). Raises
    :class:`~gateway.front.pool.StartupError` or ``OSError`` when a child process
    or the HTTP socket cannot start.
    """
    app = build_app(config)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    try:
        await runner.setup()
        tls = tls_context(config)
        site = web.TCPSite(runner, config.http.host, config.http.port, ssl_context=tls)
        await site.start()
        if on_listening is not None:
            scheme = "https" if tls is not None else "http"
            on_listening(f"{scheme}://{config.http.host}:{config.http.port}/")
        await (shutdown_trigger or _signalled)()
    finally:
        await runner.cleanup()


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context when ``http.tls_cert`` is set (HTTPS and WSS)."""
    if not config.http.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.http.tls_cert, config.http.tls_key)
    return context


async def _signalled() -> None:
    """Return on the first SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def build_app(config: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[SESSIONS] = set()
    app.cleanup_ctx.append(_embedded_targets)
    app.cleanup_ctx.append(_workers_and_calls)
    app.on_shutdown.append(_close_sessions)
    app.on_response_prepare.append(_say_less)
    auth = config.auth_enabled
    handler = websocket_handler(
        MANAGER,
        METRICS,
        config.webrtc.ice_servers,
        config.http.max_message_bytes,
        SESSIONS,
        config.http.heartbeat,
        verifier=TokenVerifier.from_config(config) if auth else None,
        origins=OriginPolicy(
            config.http.allowed_origins,
            allow_missing=not auth or config.auth.allow_non_browser,
            loopback=config.http.loopback,
        ),
        per_address=ConnectionCounter(config.http.max_connections_per_ip),
        max_messages_per_second=config.http.max_messages_per_second,
        client_address=ClientAddress(config.http.trusted_proxies),
    )
    app.router.add_get("/", _static("index.html", "text/html"))
    app.router.add_get("/sipgw.js", _static("sipgw.js", "text/javascript"))
    app.router.add_get("/widget.js", _static("widget.js", "text/javascript"))
    app.router.add_get("/demo/widget", _static("demo-widget.html", "text/html"))
    app.router.add_get("/favicon.ico", _static("favicon.svg", "image/svg+xml"))
    app.router.add_get("/ws", handler)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/readyz", _ready)
    app.router.add_get("/debug/census", _census)
    return app


async def _embedded_targets(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.embedded.enabled:
        yield
        return

    def on_lost(keys: set[int]) -> None:  # its calls get no BYE: end them
        if MANAGER in app:
            app[MANAGER].end_calls(keys, ending(End.TARGET_DIED))

    targets = EmbeddedTargets(config, on_lost, logging.getLogger().getEffectiveLevel())
    await targets.start()
    app[TARGETS] = targets
    logger.info("embedded targets echo and tone at sip:%s", ", ".join(targets.addresses))
    yield
    await targets.stop()


async def _workers_and_calls(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    targets = app[TARGETS] if TARGETS in app else None
    manager: CallManager[WorkerHandle] | None = None

    # The pool and the manager refer to each other: the pool's callbacks reach
    # the manager, created right after the pool.
    def on_message(worker: WorkerHandle, message: FromWorker) -> None:
        assert manager is not None
        manager.on_worker_message(worker, message)

    def on_lost(worker: WorkerHandle) -> None:
        assert manager is not None
        manager.on_worker_lost(worker)  # its calls' SIP peers get BYE from the front

    pool = WorkerPool(
        worker_params(config, logging.getLogger().getEffectiveLevel()),
        on_message,
        on_lost,
        config.workers.restart_delay,
        config.workers.max_setups_per_second,
    )
    orphans = Orphans(config.sip.bind, client_context(config.sip))
    manager = CallManager(
        pool,
        config.rules,
        {"registrar": config.registrar.realm_domain} if config.registrar.uri else {},
        app[METRICS],
        config.http.max_calls_per_connection,
        config.http.max_call_rate,
        embedded=targets,
        on_orphaned=orphans.end,
        registrations=Registrations(
            config.registrar,
            config.accounts,
            pool,
            pool.workers,
            PJSUA_MAX_ACC - config.sip.own_accounts,
        ),
        quotas=QuotaLimits(
            calls_per_user=config.http.max_calls_per_user,
            calls_per_ip=config.http.max_calls_per_ip,
            calls_total=config.http.max_calls_total,
            per_minute_per_user=config.http.calls_per_minute_per_user,
            per_minute_per_ip=config.http.calls_per_minute_per_ip,
        ),
        allowed_headers=config.sip.allowed_headers,
    )
    app[POOL] = pool
    app[MANAGER] = manager
    await pool.start()  # its errors name the SIP keys; the orphans socket comes after
    try:
        await orphans.start()
    except OSError as exc:
        await pool.stop()
        raise StartupError(
            f"sip.bind = {config.sip.bind!r}: cannot open a UDP socket: {exc}"
        ) from None
    ports = ", ".join(str(w.sip_port) for w in pool.workers)
    logger.info("%d workers ready (SIP ports %s)", len(pool.workers), ports)
    if config.sip.tls and not config.sip.tls_verify:
        logger.warning(
            "sip.tls_verify = false: the PBX's certificate is not checked, so anyone on "
            "the path can pose as the PBX and read the calls%s",
            " and their SRTP keys" if config.sip.srtp != "off" else "",
        )
    yield
    manager.end_all(ending(End.SHUTDOWN))
    await pool.stop()
    await orphans.close()


async def _close_sessions(app: web.Application) -> None:
    if MANAGER in app:
        manager = app[MANAGER]
        manager.end_all(ending(End.SHUTDOWN))
        # Let the hangup events reach the browsers before their sockets close.
        await manager.wait_idle(SHUTDOWN_GRACE)
    sessions: set[Session] = app[SESSIONS]
    closes = [s.close(WSCloseCode.GOING_AWAY, b"gateway shutting down", 0.5) for s in sessions]
    await asyncio.gather(*closes)


async def _say_less(request: web.Request, response: web.StreamResponse) -> None:
    """Name the product, not the HTTP library and its version."""
    response.headers[hdrs.SERVER] = SERVER_HEADER


def _static(name: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A packaged static file, revalidated by ETag (it changes with each release)."""
    body = resources.files("gateway").joinpath(f"static/{name}").read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'

    async def handler(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-cache", "ETag": etag, "X-Content-Type-Options": "nosniff"}
        if request.headers.get(hdrs.IF_NONE_MATCH) == etag:
            return web.Response(status=304, headers=headers)
        charset = "utf-8" if content_type.startswith("text/") else None
        return web.Response(body=body, content_type=content_type, charset=charset, headers=headers)

    return handler


async def _metrics(request: web.Request) -> web.Response:
    secret = request.app[CONFIG].http.metrics_secret
    if secret:
        given = request.headers.get(hdrs.AUTHORIZATION, "")
        if not hmac.compare_digest(given.encode(), f"Bearer {secret}".encode()):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _health(request: web.Request) -> web.Response:
    """Liveness: 200 while at least one worker can take calls; every process's state."""
    pool = request.app[POOL]
    ready = sum(1 for w in pool.workers if w.ready)
    body: dict[str, Any] = {
        "workers_ready": ready,
        "workers": len(pool.workers),
        "calls_active": request.app[MANAGER].active,
        "call_slots_free": sum(w.free for w in pool.workers),
    }
    if TARGETS in request.app:
        body.update(request.app[TARGETS].health())
    return web.json_response(body, status=200 if ready else 503)


async def _ready(request: web.Request) -> web.Response:
    """Readiness: 200 only when every worker and every targets process is ready."""
    not_ready = [f"worker {w.index}" for w in request.app[POOL].workers if not w.ready]
    if TARGETS in request.app:
        not_ready += [f"targets {p.index}" for p in request.app[TARGETS].processes if not p.ready]
    if not request.app[MANAGER].accepting:
        not_ready.append("shutting down")
    body = {"ready": not not_ready, "not_ready": not_ready}
    return web.json_response(body, status=503 if not_ready else 200)


#: How long the census waits for each worker's and targets process's reply.
CENSUS_TIMEOUT = 1.0


async def _census(request: web.Request) -> web.Response:
    """What every gateway process holds: fds, threads, tasks, sockets, calls (leak checks).

    Pids, task names and counts are for the operator on this host: any other
    peer gets 404, as for a page that does not exist.
    """
    if not loopback_peer(request.remote):
        raise web.HTTPNotFound()
    app = request.app
    pool, manager = app[POOL], app[MANAGER]
    front: dict[str, Any] = {  # counted first: asking the children starts tasks here
        **process_census(),
        "calls": manager.active,
        "call_owners": manager.connections,
        "websockets": len(app[SESSIONS]),
        "worker_slots": sum(len(w.slots) for w in pool.workers),
        "quota_calls": manager.quotas.live_total,
    }
    children = [pool.census(CENSUS_TIMEOUT)]
    if TARGETS in app:
        front["targets_slots"] = sum(len(p.slots) for p in app[TARGETS].processes)
        children.append(app[TARGETS].pool.census(CENSUS_TIMEOUT))
    workers, *targets = await asyncio.gather(*children)
    return web.json_response(
        {"front": front, "workers": workers, "targets": targets[0] if targets else []}
    )
