"""The pages as a real site hosts them: under a path prefix, on another origin, with tokens.

A small aiohttp "site" plays the web developer's server: it reverse-proxies the
gateway under ``/phone/`` (HTTP and the WebSocket), serves a shop page carrying
the widget tag, and mints tokens at ``POST /token`` as a site backend would
(docs/security.md). The gateway has ``[auth]`` on and allows only the site's
origin. Chromium then uses the softphone at ``/phone/`` (relative URLs must
hold), survives the proxy dropping every WebSocket (sipgw.js reconnects with
backoff and the page calls again), and the widget calls in one click with a
token fetched from the site.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from conftest import Gateway
from peers.chromium import CHROMIUM, MIC_HZ, TOLERANCE_HZ, launch
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from test_browser import measure
from test_sdk import HOST_STYLES

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
]

SECRET = "site-and-gateway-share-this-secret-0123456789abcdef"
AUDIENCE = "sipgw-hosting-test"

SHOP_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>shop</title>
<style>body { font: 17px Georgia, serif; color: rgb(40, 10, 90); } button { margin: 7px; }</style>
</head><body><p id="para">Questions? Call us.</p><button id="host-button">Buy</button>
<script src="/phone/widget.js" data-to="echo" data-token-url="/token" async></script>
</body></html>"""


def mint(sub: str = "visitor") -> str:
    now = int(time.time())
    claims = {"sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 300, "dial": ["echo"]}
    return jwt.encode(claims, SECRET, "HS256")


class Site:
    """The web developer's server, on 127.0.0.1, in front of the gateway."""

    def __init__(self, port: int, gateway_url: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.upstream = gateway_url
        self.tokens_minted = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.app = web.Application()
        self.app.router.add_get("/shop", self.shop)
        self.app.router.add_post("/token", self.token)
        self.app.router.add_get("/phone/ws", self.websocket)
        self.app.router.add_get("/phone/{path:.*}", self.proxy)
        self.runner = web.AppRunner(self.app)

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.drop_websockets()
        await self.runner.cleanup()

    async def shop(self, request: web.Request) -> web.Response:
        return web.Response(text=SHOP_PAGE, content_type="text/html")

    async def token(self, request: web.Request) -> web.Response:
        self.tokens_minted += 1
        return web.json_response({"token": mint()})

    async def proxy(self, request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as session:
            url = f"{self.upstream}/{request.match_info['path']}"
            async with session.get(url, params=request.query) as upstream:
                body = await upstream.read()
                return web.Response(
                    body=body, status=upstream.status, content_type=upstream.content_type
                )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        browser = web.WebSocketResponse()
        await browser.prepare(request)
        self.sockets.add(browser)
        headers = {"Origin": request.headers.get("Origin", "")}
        ws_url = self.upstream.replace("http", "ws", 1) + "/ws"
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(ws_url, headers=headers) as gateway,
            ):

                async def up() -> None:
                    async for message in browser:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            await gateway.send_str(message.data)

                async def down() -> None:
                    async for message in gateway:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            await browser.send_str(message.data)

                tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    task.cancel()
        finally:
            self.sockets.discard(browser)
            await browser.close()
        return browser

    async def drop_websockets(self) -> int:
        """Close every proxied WebSocket, as a proxy restart or a network change would."""
        dropped = list(self.sockets)
        for ws in dropped:
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        return len(dropped)


@pytest.fixture
def site_port() -> int:
    return free_port()


@pytest.fixture
def hosted_gateway(tmp_path: Path, site_port: int) -> Iterator[Gateway]:
    port = free_port()
    settings = {
        "http": {"allowed_origins": [f"http://127.0.0.1:{site_port}"]},
        "auth": {"enabled": True, "secret": SECRET, "audience": AUDIENCE},
    }
    gw = start_gateway(tmp_path, make_config(port, settings=settings), http_port=port)
    try:
        gw.wait_ready()
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture
async def site(hosted_gateway: Gateway, site_port: int) -> AsyncIterator[Site]:
    site = Site(site_port, hosted_gateway.url)
    await site.start()
    try:
        yield site
    finally:
        await site.stop()


@pytest.fixture
async def chromium(tmp_path: Path) -> AsyncIterator[Any]:
    async with launch(tmp_path) as browser:
        yield browser


async def call_and_hear_echo(page: Any) -> None:
    await page.fill("#number", "echo")
    await page.click("#call")
    await page.wait_for_function("() => window.sipgw.state === 'connected'", timeout=20_000)
    result = await measure(page)
    assert abs(result["hz"] - MIC_HZ) <= TOLERANCE_HZ and result["rms"] > 0.02, result


async def test_softphone_under_a_path_prefix_reconnects_after_the_proxy_drops_it(
    chromium: Any, site: Site, hosted_gateway: Gateway
) -> None:
    page = await chromium.new_page()
    await page.goto(f"{site.url}/phone/?ec=0#token={mint('alice')}")
    await page.wait_for_selector("#link.on", timeout=10_000)
    await call_and_hear_echo(page)

    assert await site.drop_websockets() == 1
    await page.wait_for_function("() => window.sipgw.state.startsWith('ended')", timeout=10_000)
    assert await page.inner_text("#message") == "The connection to the gateway was lost."
    # sipgw.js reopens the socket (0.5 s backoff first), with the same token.
    await page.wait_for_selector("#link.on", timeout=10_000)
    await call_and_hear_echo(page)
    await page.click("#hangup")
    await page.wait_for_function("() => window.sipgw.state.startsWith('ended')", timeout=10_000)
    assert await page.inner_text("#message") == "Call ended."
    hellos = [e for e in await page.evaluate("() => window.sipgw.events") if e["type"] == "welcome"]
    assert len(hellos) == 2, hellos


async def test_softphone_without_a_token_says_so(chromium: Any, site: Site) -> None:
    page = await chromium.new_page()
    await page.goto(f"{site.url}/phone/")
    await page.wait_for_selector("#link.off", timeout=10_000)
    message = await page.inner_text("#message")
    assert message.startswith("This gateway needs a sign-in token"), message


async def test_widget_on_another_site_fetches_a_token_and_calls(chromium: Any, site: Site) -> None:
    page = await chromium.new_page()
    await page.goto(f"{site.url}/shop")
    await page.wait_for_selector("sipgw-call")
    before = await page.evaluate(HOST_STYLES)
    assert site.tokens_minted == 0  # nothing is fetched before the visitor clicks
    await page.click("sipgw-call >> text=Call echo")
    await page.wait_for_function(
        "() => document.querySelector('sipgw-call').dataset.state === 'in call'", timeout=20_000
    )
    assert site.tokens_minted == 1
    assert await page.evaluate(HOST_STYLES) == before
    await page.click("sipgw-call >> text=Hang up")
    await page.wait_for_function(
        "() => document.querySelector('sipgw-call').dataset.state.startsWith('ended')",
        timeout=10_000,
    )
