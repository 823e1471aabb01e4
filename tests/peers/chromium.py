"""Headless Chromium for the browser tests: Debian's ``/usr/bin/chromium``, driven by Playwright.

Never ``playwright install``. The fake microphone plays a 440 Hz WAV file made
here; :func:`launch` starts the browser with the flags every browser test uses.
"""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = "/usr/bin/chromium"
RATE = 48000
MIC_HZ = 440.0
TOLERANCE_HZ = 15.0


def write_tone_wav(path: Path, hz: float, seconds: float = 10.0, amplitude: float = 0.5) -> Path:
    t = np.arange(int(RATE * seconds)) / RATE
    pcm = (np.sin(2 * np.pi * hz * t) * amplitude * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return path


@asynccontextmanager
async def launch(
    directory: Path, loopback: bool = True, extra_args: tuple[str, ...] = ()
) -> AsyncIterator[Any]:
    """Chromium with a fake 440 Hz microphone (its WAV file written in ``directory``).

    ``loopback=False`` leaves out ``--allow-loopback-in-peer-connection``, as a
    user's browser would: it then offers no loopback candidates at all, and the
    gateway (loopback-only) must still connect (peer-reflexive candidates).
    """
    from playwright.async_api import async_playwright

    wav = write_tone_wav(directory / "mic-440.wav", MIC_HZ)
    loopback_flag = ["--allow-loopback-in-peer-connection"] if loopback else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            ignore_default_args=["--mute-audio"],
            args=[
                "--headless=new",
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                *loopback_flag,
                "--autoplay-policy=no-user-gesture-required",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-gpu",
                "--disable-quic",
                *extra_args,
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()
