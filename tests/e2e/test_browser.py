"""A real browser places calls through the gateway's demo page.

Headless Chromium (Debian's, driven by Playwright) opens ``/?ec=0`` with a fake
microphone that plays a 440 Hz WAV file, calls ``echo`` and measures what comes
back with a WebAudio analyser on the remote stream. Calling ``tone`` must give
1 kHz instead: that proves the analyser measures what the gateway sends, not
the local microphone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Gateway
from peers.chromium import CHROMIUM, MIC_HZ, TOLERANCE_HZ, launch
from peers.sipp import SippPhone

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
]


# Runs in the page: listens to the remote stream for a while and returns the
# dominant frequency (FFT peak, parabolic interpolation between bins) and levels.
MEASURE_JS = """
async ({fftSize, samples, intervalMs}) => {
  const audio = document.getElementById("remote");
  audio.muted = false;
  audio.volume = 1.0;
  await audio.play();
  const ctx = new AudioContext();
  await ctx.resume();
  const source = ctx.createMediaStreamSource(window.sipgw.remoteStream);
  const analyser = ctx.createAnalyser();
  analyser.fftSize = fftSize;
  analyser.smoothingTimeConstant = 0;
  source.connect(analyser);
  const spectrum = new Float32Array(analyser.frequencyBinCount);
  const wave = new Float32Array(analyser.fftSize);
  const binHz = ctx.sampleRate / analyser.fftSize;
  const reads = [];
  await new Promise((r) => setTimeout(r, 500));  // let the analyser fill up
  for (let i = 0; i < samples; i++) {
    await new Promise((r) => setTimeout(r, intervalMs));
    analyser.getFloatFrequencyData(spectrum);
    analyser.getFloatTimeDomainData(wave);
    let peak = 1;  // skip DC
    for (let k = 2; k < spectrum.length; k++) if (spectrum[k] > spectrum[peak]) peak = k;
    const [a, b, c] = [spectrum[peak - 1], spectrum[peak], spectrum[peak + 1]];
    const denom = a - 2 * b + c;
    const offset = denom !== 0 && isFinite(denom) ? 0.5 * (a - c) / denom : 0;
    let sum = 0;
    for (const x of wave) sum += x * x;
    reads.push({ hz: (peak + offset) * binHz, peakDb: b, rms: Math.sqrt(sum / wave.length) });
  }
  const result = { sampleRate: ctx.sampleRate, binHz, reads, paused: audio.paused };
  source.disconnect();
  await ctx.close();
  return result;
}
"""


@pytest.fixture(
    params=[True, False],
    ids=["loopback-flag", "stock-chrome"],
)
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Chromium with a fake 440 Hz microphone, with and without loopback candidates."""
    async with launch(tmp_path, loopback=request.param) as chromium:
        yield chromium


async def open_call(browser: Any, gateway: Gateway, to: str) -> Any:
    """Open the demo page, call ``to`` and wait until the call is connected."""
    page = await browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    await page.goto(f"{gateway.url}/?ec=0")
    await page.evaluate("(to) => window.sipgw.call(to)", to)
    try:
        await page.wait_for_function(
            "() => window.sipgw.state === 'connected' && window.sipgw.remoteStream",
            timeout=20_000,
        )
    except Exception as exc:
        state = await page.evaluate("() => window.sipgw.state")
        events = await page.evaluate(
            "() => window.sipgw.events.map(e => ({...e, sdp: e.sdp ? '...' : undefined}))"
        )
        log = await page.inner_text("#log")
        raise AssertionError(
            f"call to {to!r} not connected: state={state!r} events={events}\n"
            f"page log:\n{log}\nconsole: {console}\n"
            f"gateway log tail:\n{gateway.log.read_text()[-3000:]}"
        ) from exc
    return page


async def measure(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        MEASURE_JS, {"fftSize": 16384, "samples": 8, "intervalMs": 300}
    )
    reads = result["reads"]
    result["hz"] = float(np.median([r["hz"] for r in reads]))
    result["rms"] = float(np.median([r["rms"] for r in reads]))
    result["peak_db"] = float(np.median([r["peakDb"] for r in reads]))
    return result


async def hangup(page: Any) -> dict[str, Any]:
    await page.evaluate("() => window.sipgw.hangup()")
    await page.wait_for_function(
        "() => window.sipgw.events.some(e => e.type === 'hangup')", timeout=10_000
    )
    event: dict[str, Any] = await page.evaluate(
        "() => window.sipgw.events.find(e => e.type === 'hangup')"
    )
    return event


async def test_browser_echo_returns_microphone_tone(
    browser: Any, gateway: Gateway, tmp_path: Path
) -> None:
    page = await open_call(browser, gateway, "echo")
    result = await measure(page)
    print(f"echo: {result['hz']:.1f} Hz, rms {result['rms']:.3f}, peak {result['peak_db']:.1f} dB")

    assert result["paused"] is False, "the remote <audio> element is not playing"
    assert abs(result["hz"] - MIC_HZ) <= TOLERANCE_HZ, result
    assert result["rms"] > 0.02, f"echo is (nearly) silent: {result}"
    assert result["peak_db"] > -50, result

    event = await hangup(page)
    assert event["by"] == "local", event
    await page.wait_for_function("() => window.sipgw.state.startsWith('ended')", timeout=5_000)


async def test_browser_tone_is_not_the_microphone(browser: Any, gateway: Gateway) -> None:
    page = await open_call(browser, gateway, "tone")
    result = await measure(page)
    print(f"tone: {result['hz']:.1f} Hz, rms {result['rms']:.3f}, peak {result['peak_db']:.1f} dB")

    assert abs(result["hz"] - 1000.0) <= TOLERANCE_HZ, result
    assert abs(result["hz"] - MIC_HZ) > 100, result
    assert result["rms"] > 0.02, f"tone is (nearly) silent: {result}"

    event = await hangup(page)
    assert event["by"] == "local", event


class _RtpSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.packets.append(data)


async def test_browser_in_band_dtmf_reaches_the_phone_as_rfc4733(
    browser: Any, gateway: Gateway, tmp_path: Path
) -> None:
    """Chromium's RTCDTMFSender sends telephone-events inside its RTP; the gateway
    negotiates them, takes them out of the stream and sends each digit on to the
    phone with the payload type the phone answered (96), not the browser's."""
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(_RtpSink, local_addr=("127.0.0.1", 0))
    rtp_port = transport.get_extra_info("sockname")[1]
    try:
        async with SippPhone("dtmf", tmp_path, dtmf_pt=96, rtp_port=rtp_port) as phone:
            page = await open_call(browser, gateway, f"sipp{phone.port}")
            answer = await page.evaluate("() => sipgw.pc.remoteDescription.sdp")
            assert "telephone-event/48000" in answer, answer
            sent = await page.evaluate(
                """() => new Promise((resolve) => {
                    const dtmf = sipgw.pc.getSenders().find((s) => s.dtmf).dtmf;
                    const tones = [];
                    dtmf.ontonechange = (e) => {
                        if (!e.tone) resolve(tones); else tones.push(e.tone);
                    };
                    dtmf.insertDTMF("19#B", 120, 80);
                })"""
            )
            assert sent == ["1", "9", "#", "B"], sent
            await asyncio.sleep(1.5)
            events = [p for p in sink.packets if len(p) >= 16 and p[1] & 0x7F == 96]
            others = {p[1] & 0x7F for p in sink.packets} - {96}
            assert others <= {0}, others  # PCMU audio, nothing on the browser's payload types
            codes: list[int] = []
            for packet in events:
                if not codes or codes[-1] != packet[12]:
                    codes.append(packet[12])
            assert codes == [1, 9, 11, 13], codes  # 1, 9, # (11), B (13)
            await hangup(page)
    finally:
        transport.close()
