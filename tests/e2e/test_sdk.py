"""sipgw.js in Chromium: the SDK calls ``echo`` and ``tone`` and the page hears them.

The page imports ``/sipgw.js`` (served by the front), places a call with
trickle ICE on and off, waits for ``connected`` (the gateway accepted AND the
browser's ICE/DTLS is up) and measures the remote stream with WebAudio:
``echo`` must give the fake microphone's 440 Hz, ``tone`` 1 kHz.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Gateway
from peers.chromium import MIC_HZ, TOLERANCE_HZ
from test_trickle import chromium  # noqa: F401  (the module's shared browser)

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

#: Named in the README; refreshed by these tests.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

SDK_CALL_JS = """
async ({to, trickle}) => {
  const { SipGateway } = await import("./sipgw.js");
  const gw = await SipGateway.connect(undefined, { trickle });
  const call = gw.call(to);
  const events = [];
  const sent = [];
  const send = gw._send.bind(gw);
  gw._send = (m) => { sent.push(m.type); send(m); };
  for (const name of ["ringing", "accepted", "connected", "hangup", "error"]) {
    call.on(name, () => events.push({ name, iceState: call.pc?.connectionState }));
  }
  await new Promise((resolve, reject) => {
    call.on("connected", resolve);
    call.on("hangup", (h) => reject(new Error("hung up: " + JSON.stringify(h))));
    setTimeout(() => reject(new Error("not connected: " + JSON.stringify(events))), 20000);
  });
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 16384;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaStreamSource(call.remoteStream).connect(analyser);
  const spectrum = new Float32Array(analyser.frequencyBinCount);
  const hz = [];
  await new Promise((r) => setTimeout(r, 800));
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 300));
    analyser.getFloatFrequencyData(spectrum);
    let peak = 2;
    for (let k = 2; k < spectrum.length; k++) if (spectrum[k] > spectrum[peak]) peak = k;
    hz.push(peak * ctx.sampleRate / analyser.fftSize);
  }
  const stats = await call.getStats();
  const ended = new Promise((r) => call.on("hangup", r));
  call.hangup();
  const hangup = await ended;
  await ctx.close();
  gw.close();
  return { hz, events, sent, hangup, stats: stats !== null, state: call.state };
}
"""


async def sdk_call(chromium: Any, gateway: Gateway, to: str, trickle: bool) -> Any:  # noqa: F811
    page = await chromium.new_page()
    try:
        await page.goto(f"{gateway.url}/")
        return await page.evaluate(SDK_CALL_JS, {"to": to, "trickle": trickle})
    finally:
        await page.close()


@pytest.mark.parametrize("trickle", [True, False], ids=["trickle", "complete-offer"])
async def test_sdk_echo_returns_the_microphone(
    chromium: Any,  # noqa: F811
    gateway: Gateway,
    trickle: bool,
) -> None:
    result = await sdk_call(chromium, gateway, "echo", trickle)
    hz = float(np.median(result["hz"]))
    print(f"sdk echo (trickle={trickle}): {hz:.1f} Hz")
    assert abs(hz - MIC_HZ) <= TOLERANCE_HZ, result
    connected = next(e for e in result["events"] if e["name"] == "connected")
    assert connected["iceState"] == "connected", result["events"]
    assert ("candidate" in result["sent"]) is trickle, result["sent"]
    assert result["hangup"]["by"] == "local", result
    assert result["state"] == "ended" and result["stats"], result


async def test_sdk_tone_is_not_the_microphone(chromium: Any, gateway: Gateway) -> None:  # noqa: F811
    result = await sdk_call(chromium, gateway, "tone", True)
    hz = float(np.median(result["hz"]))
    assert abs(hz - 1000.0) <= TOLERANCE_HZ, result


async def test_sdk_and_favicon_are_served_with_types_and_cache_headers(gateway: Gateway) -> None:
    for path, kind in (("/sipgw.js", "text/javascript"), ("/favicon.ico", "image/svg+xml")):
        with urllib.request.urlopen(f"{gateway.url}{path}") as response:
            assert response.headers["Content-Type"].startswith(kind), response.headers
            assert response.headers["Cache-Control"] == "no-cache"
            etag = response.headers["ETag"]
            assert etag and response.read()
        request = urllib.request.Request(f"{gateway.url}{path}", headers={"If-None-Match": etag})
        try:
            urllib.request.urlopen(request)
            raise AssertionError("no 304 for a matching ETag")
        except urllib.error.HTTPError as exc:
            assert exc.code == 304


async def test_softphone_page_enter_twice_places_one_call(
    chromium: Any,  # noqa: F811
    gateway: Gateway,
) -> None:
    """Enter pressed twice used to start two calls, one of which could never be hung up."""
    page = await chromium.new_page()
    try:
        await page.goto(f"{gateway.url}/?ec=0")
        await page.fill("#number", "echo")
        await page.press("#number", "Enter")
        await page.press("#number", "Enter")
        await page.wait_for_function("() => window.sipgw.state === 'connected'", timeout=20_000)
        ice = await page.evaluate("() => window.sipgw.pc.connectionState")
        assert ice == "connected"  # connected is shown only once media is up
        await page.evaluate("() => window.sipgw.hangup()")
        await page.wait_for_function("() => window.sipgw.state.startsWith('ended')")
        events = await page.evaluate("() => window.sipgw.events.map(e => e.type)")
        assert events.count("answer") == 1, events
        assert "error" not in events, events
        audio = await page.evaluate(
            "() => ({paused: document.getElementById('remote').paused,"
            " src: document.getElementById('remote').srcObject})"
        )
        assert audio == {"paused": True, "src": None}, audio
    finally:
        await page.close()


#: The computed styles of the sample host page's own elements, which the widget
#: (shadow DOM) must leave as they were.
HOST_STYLES = """() => [document.body, document.getElementById('para'),
    document.getElementById('host-button')].map(e => {
      const s = getComputedStyle(e);
      return [s.fontFamily, s.fontSize, s.color, s.backgroundColor, s.margin];
    })"""


async def test_widget_calls_in_one_click_without_touching_the_host_styles(
    chromium: Any,  # noqa: F811
    gateway: Gateway,
) -> None:
    page = await chromium.new_page()
    try:
        await page.goto(f"{gateway.url}/demo/widget")
        await page.wait_for_selector("sipgw-call")
        before = await page.evaluate(HOST_STYLES)
        await page.click("sipgw-call >> text=Call echo")
        await page.wait_for_function(
            "() => document.querySelector('sipgw-call').dataset.state === 'in call'",
            timeout=20_000,
        )
        assert await page.evaluate(HOST_STYLES) == before
        await page.screenshot(path=SCREENSHOTS / "widget.png")
        await page.click("sipgw-call >> text=Hang up")
        await page.wait_for_function(
            "() => document.querySelector('sipgw-call').dataset.state.startsWith('ended')",
            timeout=10_000,
        )
        assert await page.evaluate(HOST_STYLES) == before
    finally:
        await page.close()
