"""Trickle ICE: Chromium sends its offer at once and its candidates after it.

The page's offer carries no ``a=candidate`` line (it is taken right after
``setLocalDescription``, before gathering); each candidate then goes in a
``candidate`` message and gathering's end as ``candidate: null``. The call must
connect and echo the 440 Hz microphone; a malformed candidate gets a
``bad_request`` error and the call stays up; a candidate for an unknown call
gets ``not_found``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from conftest import Gateway
from peers.chromium import CHROMIUM, MIC_HZ, TOLERANCE_HZ, launch

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}"),
]

# Runs in the page: a minimal trickle client on the raw protocol.
TRICKLE_JS = """
async ({to, extra}) => {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  const inbox = [];
  const waiters = [];
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    inbox.push(m);
    for (const w of [...waiters]) {
      if (w.test(m)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(m); }
    }
  };
  const next = (test, ms = 15000) => new Promise((resolve, reject) => {
    const found = inbox.find(test);
    if (found) return resolve(found);
    waiters.push({ test, resolve });
    const got = () => JSON.stringify(inbox.map((m) => m.type));
    setTimeout(() => reject(new Error("timeout; got " + got())), ms);
  });
  await new Promise((r) => (ws.onopen = r));
  ws.send(JSON.stringify({ type: "hello" }));
  const welcome = await next((m) => m.type === "welcome");
  const pc = new RTCPeerConnection({ iceServers: welcome.ice_servers });
  const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
  for (const t of mic.getTracks()) pc.addTrack(t, mic);
  const remote = new Promise((r) => {
    pc.ontrack = (e) => r(e.streams[0] || new MediaStream([e.track]));
  });
  const sent = [];
  const early = [];
  let calling = false;
  const send = (candidate) => {
    const msg = { type: "candidate", call: "t1", candidate };
    sent.push(candidate);
    ws.send(JSON.stringify(msg));
  };
  pc.onicecandidate = (e) => {
    const c = e.candidate ? e.candidate.toJSON() : null;
    if (calling) send(c); else early.push(c);
  };
  await pc.setLocalDescription(await pc.createOffer());
  const offer = pc.localDescription.sdp;
  ws.send(JSON.stringify({ type: "call", call: "t1", to, sdp: offer }));
  calling = true;
  for (const c of early) send(c);
  for (const m of extra) ws.send(JSON.stringify(m));
  const answer = await next((m) => m.type === "answer" || m.type === "hangup" ||
                                   (m.type === "error" && !m.id));
  if (answer.type !== "answer") return { failed: answer, inbox };
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  await next((m) => m.type === "accepted");
  await new Promise((resolve, reject) => {
    const check = () => {
      if (pc.connectionState === "connected") resolve();
      else if (pc.connectionState === "failed") reject(new Error("ICE failed"));
    };
    pc.onconnectionstatechange = check;
    check();
  });
  const stream = await remote;
  const audio = new Audio();
  audio.srcObject = stream;
  await audio.play();
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 16384;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaStreamSource(stream).connect(analyser);
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
  ws.send(JSON.stringify({ type: "hangup", call: "t1" }));
  const hangup = await next((m) => m.type === "hangup");
  // A candidate for a call that is gone: not_found.
  const stale = { candidate: sent.find(Boolean)?.candidate || "", sdpMid: "0" };
  ws.send(JSON.stringify({ type: "candidate", call: "t1", id: "late", candidate: stale }));
  const late = await next((m) => m.type === "error" && m.id === "late");
  await ctx.close();
  pc.close();
  mic.getTracks().forEach((t) => t.stop());
  ws.close();
  return { offer, sent, hz, hangup, late, inbox: inbox.map((m) => ({ ...m, sdp: undefined })) };
}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """One Chromium (fake 440 Hz microphone, loopback candidates allowed) for the module."""
    async with launch(tmp_path_factory.mktemp("trickle")) as browser:
        yield browser


async def trickle_call(chromium: Any, gateway: Gateway, extra: list[dict[str, Any]]) -> Any:
    page = await chromium.new_page()
    try:
        await page.goto(f"{gateway.url}/")
        result = await page.evaluate(TRICKLE_JS, {"to": "echo", "extra": extra})
    finally:
        await page.close()
    assert "failed" not in result, f"{result}\n{gateway.log.read_text()[-3000:]}"
    return result


async def test_trickled_candidates_connect_and_echo(chromium: Any, gateway: Gateway) -> None:
    result = await trickle_call(chromium, gateway, [])
    assert "a=candidate" not in result["offer"], "the offer was not a trickle offer"
    loopback = [c for c in result["sent"] if c and " 127.0.0.1 " in c["candidate"]]
    assert loopback, f"Chromium trickled no loopback candidate: {result['sent']}"
    assert result["sent"][-1] is None, "no end-of-candidates marker sent"
    errors = [m for m in result["inbox"] if m["type"] == "error" and m.get("id") != "late"]
    assert errors == [], errors
    hz = float(np.median(result["hz"]))
    print(f"trickle echo: {hz:.1f} Hz, {len(result['sent'])} candidate messages")
    assert abs(hz - MIC_HZ) <= TOLERANCE_HZ, result["hz"]
    assert result["hangup"]["by"] == "local", result["hangup"]
    assert result["late"]["code"] == "not_found", result["late"]


async def test_bad_candidates_are_refused_and_the_call_lives(
    chromium: Any, gateway: Gateway
) -> None:
    bad = [
        {"type": "candidate", "call": "t1", "id": "b1", "candidate": {"candidate": "junk"}},
        {"type": "candidate", "call": "t1", "id": "b2", "candidate": "candidate:1 1 udp"},
        {
            "type": "candidate",
            "call": "t1",
            "id": "b3",
            "candidate": {
                "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 99999 typ host",
                "sdpMid": "0",
            },
        },
        {
            "type": "candidate",
            "call": "t1",
            "id": "b4",
            "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": 3},
        },
    ]
    result = await trickle_call(chromium, gateway, bad)
    errors = {m["id"]: m for m in result["inbox"] if m["type"] == "error"}
    for request in ("b1", "b2", "b3", "b4"):
        assert errors[request]["code"] == "bad_request", errors
    assert errors["b1"]["call"] == "t1"
    hz = float(np.median(result["hz"]))
    assert abs(hz - MIC_HZ) <= TOLERANCE_HZ, result["hz"]
    assert result["hangup"]["by"] == "local", result["hangup"]
