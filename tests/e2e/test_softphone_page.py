"""The softphone page at ``/``, clicked through in Chromium against real phones.

The page (``gateway/static/index.html``, on top of ``sipgw.js``) is driven the
way a person would: typing the number, clicking Call, the dial-pad keys, Mute,
Hold, Hang up, the register form and the incoming-call prompt. What arrived is
checked at the far end: the pjsua2 phone hears the fake microphone's 440 Hz
and receives the clicked digits, the page hears the phone's 700 Hz, Kamailio's
caller gets 486 for a rejected call. The screenshots the README shows are
written here.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway
from peers.chromium import CHROMIUM, MIC_HZ, TOLERANCE_HZ, launch
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from peers.pjsua_phone import PjsuaPhone
from test_browser import measure
from test_register import caller, pbx

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
]

PHONE_HZ = 700
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
SETUP_TIMEOUT = 3.0


@pytest.fixture
async def chromium(tmp_path: Path) -> AsyncIterator[Any]:
    async with launch(tmp_path) as browser:
        yield browser


async def open_page(chromium: Any, url: str, init_script: str = "") -> Any:
    context = await chromium.new_context(viewport={"width": 390, "height": 844})  # a phone's
    if init_script:
        await context.add_init_script(init_script)
    page = await context.new_page()
    await page.goto(f"{url}/?ec=0")
    await page.wait_for_selector("#link.on", timeout=10_000)  # the WebSocket is up
    return page


async def wait_state(page: Any, state: str, timeout: float = 20_000) -> None:
    try:
        await page.wait_for_function(
            "(s) => window.sipgw.state === s || window.sipgw.state.startsWith(s)",
            arg=state,
            timeout=timeout,
        )
    except Exception as exc:
        status = await page.evaluate("() => [window.sipgw.state, document.body.innerText]")
        raise AssertionError(f"page never reached {state!r}: {status}") from exc


async def text(page: Any, selector: str) -> str:
    return str(await page.inner_text(selector)).strip()


async def test_page_calls_a_phone_with_pad_digits_mute_and_hold(
    chromium: Any, gateway: Gateway, tmp_path: Path
) -> None:
    async with PjsuaPhone(tmp_path, tone_hz=PHONE_HZ) as phone:
        page = await open_page(chromium, gateway.url)
        assert await page.is_hidden("#insecure")  # http://127.0.0.1 is a secure context
        await page.fill("#number", f"sipp{phone.port}")
        await page.click("#call")
        await wait_state(page, "connected")
        await phone.wait_confirmed()
        assert await text(page, "#status") == "In call"
        assert await page.is_hidden("#call") and await page.is_visible("#hangup")

        heard = await phone.wait_for_tone(MIC_HZ)
        assert abs(heard.hz - MIC_HZ) <= 10 and heard.rms > 0.03, heard
        result = await measure(page)
        assert abs(result["hz"] - PHONE_HZ) <= TOLERANCE_HZ and result["rms"] > 0.02, result

        assert re.fullmatch(r"00:0\d", await text(page, "#timer")), await text(page, "#timer")
        levels = await page.evaluate(
            "() => ['mic-level', 'remote-level'].map((id) => document.getElementById(id).value)"
        )
        assert min(levels) > 0.01, levels  # both meters move

        for key in "159#":
            await page.click(f"#pad button[data-key='{key}']")
            await asyncio.sleep(0.25)
        deadline = time.monotonic() + 5
        while phone.digits() != "159#" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert phone.digits() == "159#", phone.digits()
        assert await page.input_value("#number") == f"sipp{phone.port}"  # digits went as DTMF
        await page.screenshot(path=SCREENSHOTS / "softphone-in-call.png")

        await page.click("#mute")
        assert await page.get_attribute("#mute", "aria-pressed") == "true"
        assert (await phone.wait_for_silence()).rms < 0.005
        await page.click("#mute")
        assert abs((await phone.wait_for_tone(MIC_HZ)).hz - MIC_HZ) <= 10

        start = len(phone.events)
        await page.click("#hold")
        media = await phone.wait_event(
            lambda e: e.get("event") == "media" and e["remote_sdp"]["dir"] == "sendonly", 10, start
        )
        assert media["local_sdp"]["dir"] == "recvonly", media
        await page.wait_for_function("() => document.getElementById('hold').ariaPressed === 'true'")
        assert await text(page, "#status") == "On hold"
        await page.click("#hold")
        await page.wait_for_function(
            "() => document.getElementById('hold').ariaPressed === 'false'"
        )
        assert abs((await phone.wait_for_tone(MIC_HZ)).hz - MIC_HZ) <= 10

        await page.click("#hangup")
        gone = await phone.wait_disconnected()
        assert gone["code"] == 200, gone
        await wait_state(page, "ended", 10_000)
        assert await text(page, "#message") == "Call ended."
        assert await text(page, "#timer") != ""  # the call's length stays shown
        audio = await page.evaluate(
            "() => ({paused: document.getElementById('remote').paused,"
            " src: document.getElementById('remote').srcObject})"
        )
        assert audio == {"paused": True, "src": None}, audio
        assert await page.is_visible("#call") and await page.is_hidden("#controls")


async def test_page_registers_accepts_and_rejects_incoming_calls(
    chromium: Any, tmp_path: Path
) -> None:
    async with pbx(tmp_path) as (kam, gw):
        page = await open_page(chromium, gw.url)
        await page.click("#register-box summary")
        await page.fill("#reg-user", "1001")
        await page.fill("#reg-password", "secret1")
        await page.click("#reg-go")
        await page.wait_for_function(
            "() => document.getElementById('reg-status').textContent"
            ".startsWith('Registered as 1001')",
            timeout=15_000,
        )
        async with caller(tmp_path, kam) as phone:
            await phone.call(f"sip:1001@{kam.realm}")
            await page.wait_for_selector("#incoming", state="visible", timeout=10_000)
            assert "1002" in await text(page, "#caller")
            await page.screenshot(path=SCREENSHOTS / "softphone-incoming.png")
            await page.click("#accept")
            await wait_state(page, "connected")
            await phone.wait_confirmed()
            heard = await phone.wait_for_tone(MIC_HZ)
            assert abs(heard.hz - MIC_HZ) <= 10 and heard.rms > 0.03, heard
            result = await measure(page)
            assert abs(result["hz"] - PHONE_HZ) <= TOLERANCE_HZ, result
            await phone.hangup()
            await wait_state(page, "ended", 10_000)
            assert await text(page, "#message") == "The other side hung up."

            mark = len(phone.events)
            await phone.call(f"sip:1001@{kam.realm}")
            await page.wait_for_selector("#incoming", state="visible", timeout=10_000)
            await page.click("#reject")
            gone = await phone.wait_event(lambda e: e.get("event") == "disconnected", 10, mark)
            assert gone["code"] == 486, gone
            await page.wait_for_selector("#incoming", state="hidden", timeout=5_000)


#: Both sides lose every ICE candidate: the offer's and the trickled ones on the
#: way out, the answer's on the way in (a network that drops all UDP would do the same).
NO_CANDIDATES = """
(() => {
  const strip = (sdp) =>
    sdp.split("\\r\\n").filter((l) => !l.startsWith("a=candidate")).join("\\r\\n");
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    const m = JSON.parse(data);
    if (m.type === "candidate" && m.candidate) return;
    if (m.sdp) m.sdp = strip(m.sdp);
    return send.call(this, JSON.stringify(m));
  };
  const setRemote = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (d) {
    return setRemote.call(this, { type: d.type, sdp: strip(d.sdp) });
  };
})();
"""


async def test_page_shows_ice_failure_within_the_gateway_bound(
    chromium: Any, tmp_path: Path
) -> None:
    port = free_port()
    settings = {"calls": {"setup_timeout": SETUP_TIMEOUT}}
    gw = start_gateway(tmp_path, make_config(port, settings=settings), http_port=port)
    try:
        await asyncio.to_thread(gw.wait_ready)
        page = await open_page(chromium, gw.url, NO_CANDIDATES)
        await page.fill("#number", "echo")
        t0 = time.monotonic()
        await page.click("#call")
        await wait_state(page, "ended", (SETUP_TIMEOUT + 5) * 1000)
        elapsed = time.monotonic() - t0
        assert elapsed <= SETUP_TIMEOUT + 3, elapsed
        message = await text(page, "#message")
        assert message.startswith("The audio connection could not be set up (ICE failed)"), message
        hangup = await page.evaluate("() => window.sipgw.events.find((e) => e.type === 'hangup')")
        assert (hangup["outcome"], hangup["code"]) == ("ice_failed", 480), hangup
        assert await page.is_visible("#call") and await page.is_hidden("#hangup")
    finally:
        await asyncio.to_thread(stop_gateway, gw)


async def test_page_explains_an_insecure_context(gateway: Gateway, tmp_path: Path) -> None:
    """Loaded as http://gw.test (a name, not localhost), the page may not use the
    microphone: it says why instead of failing on the first call."""
    port = gateway.url.rsplit(":", 1)[1]
    rules = "--host-resolver-rules=MAP gw.test 127.0.0.1"
    async with launch(tmp_path, extra_args=(rules,)) as browser:
        page = await browser.new_page()
        await page.goto(f"http://gw.test:{port}/")
        assert await page.evaluate("() => window.isSecureContext") is False
        assert await page.is_visible("#insecure")
        assert "https://" in await text(page, "#insecure")
        secure = await browser.new_page()
        await secure.goto(f"{gateway.url}/")
        assert await secure.is_hidden("#insecure")


async def test_page_transfers_a_call_blind(chromium: Any, gateway: Gateway, tmp_path: Path) -> None:
    """Transfer, a number, Transfer: phone A gets the REFER for B and calls B."""
    async with (
        PjsuaPhone(tmp_path / "a", tone_hz=PHONE_HZ) as a,
        PjsuaPhone(tmp_path / "b", tone_hz=500) as b,
    ):
        page = await open_page(chromium, gateway.url)
        await page.fill("#number", f"sipp{a.port}")
        await page.press("#number", "Enter")
        await wait_state(page, "connected")
        await a.wait_confirmed()
        await page.click("#xfer-toggle")
        await page.fill("#xfer-to", f"sipp{b.port}")
        await page.click("#xfer-go")
        refer = await a.wait_event("refer", 10)
        assert f":{b.port}" in refer["uri"], refer
        await wait_state(page, "ended", 15_000)
        assert await text(page, "#message") == "Call transferred."
        await b.wait_confirmed()
        heard = await b.wait_for_tone(PHONE_HZ)
        assert abs(heard.hz - PHONE_HZ) <= 10, heard  # A and B talk; the page is out
