"""Prove the sipp phone harness works against a real SIP caller (pjsua2).

The caller is ``tests/peers/pjsua_caller.py``, run as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .sipp import SippPhone, SippReport, parse_message_log, write_ulaw_tone

CALLER = Path(__file__).resolve().parent / "pjsua_caller.py"

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@dataclass
class CallerResult:
    returncode: int
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    def ends(self) -> list[dict[str, Any]]:
        return sorted((e for e in self.events if e.get("event") == "end"), key=lambda e: e["call"])

    def end(self) -> dict[str, Any]:
        ends = self.ends()
        assert len(ends) == 1, self.describe()
        return ends[0]

    def describe(self) -> str:
        lines = "\n".join(json.dumps(e) for e in self.events)
        return f"caller rc={self.returncode}\nevents:\n{lines}\nstderr tail:\n{self.stderr[-2000:]}"


async def run_caller(uri: str, *args: str, timeout: float = 20.0) -> CallerResult:
    """Run pjsua_caller.py to completion and collect its JSON events."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CALLER),
        "--uri",
        uri,
        "--timeout",
        str(timeout),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout + 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = []
    for line in out.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            events.append(json.loads(line))
    assert proc.returncode is not None
    return CallerResult(proc.returncode, events, err.decode(errors="replace"))


def analyse(path: Path | str) -> tuple[float, float, float]:
    """(dominant frequency Hz, RMS, fraction of energy within ±10 Hz of it)."""
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        assert w.getsampwidth() == 2
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    assert len(x) > rate // 2, f"recording {path} is too short ({len(x)} samples)"
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    peak = float(freqs[int(np.argmax(spectrum))])
    near = spectrum[(freqs > peak - 10) & (freqs < peak + 10)].sum()
    return peak, float(np.sqrt(np.mean(x**2))), float(near / max(spectrum.sum(), 1e-12))


def assert_tone(path: Path | str, hz: float = 1000.0) -> None:
    peak, rms, purity = analyse(path)
    assert abs(peak - hz) <= 10, f"dominant frequency {peak} Hz, expected {hz}"
    assert rms > 1000, f"recording is (nearly) silent: rms={rms}"
    assert purity > 0.5, f"only {purity:.0%} of the energy is near {hz} Hz"


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


# --------------------------------------------------------------------------
# pure parsing (no sipp needed)
# --------------------------------------------------------------------------

SAMPLE_LOG = """\
----------------------------------------------- 2026-01-01 10:00:00.000001
UDP message received [300] bytes :

INVITE sip:1@127.0.0.1:5070 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1
From: <sip:a@127.0.0.1>;tag=a1
To: <sip:1@127.0.0.1>
Call-ID: call-1
CSeq: 1 INVITE
Content-Length: 0


----------------------------------------------- 2026-01-01 10:00:00.000002
UDP message received [300] bytes :

INVITE sip:1@127.0.0.1:5070 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1
From: <sip:a@127.0.0.1>;tag=a1
To: <sip:1@127.0.0.1>
Call-ID: call-1
CSeq: 1 INVITE
Content-Length: 0


----------------------------------------------- 2026-01-01 10:00:00.000003
UDP message sent (200 bytes):

SIP/2.0 486 Busy Here
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1
From: <sip:a@127.0.0.1>;tag=a1
To: <sip:1@127.0.0.1>;tag=b1
Call-ID: call-1
CSeq: 1 INVITE
Content-Length: 0


----------------------------------------------- 2026-01-01 10:00:00.000004
UDP message received [200] bytes :

ACK sip:1@127.0.0.1:5070 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1
From: <sip:a@127.0.0.1>;tag=a1
To: <sip:1@127.0.0.1>;tag=b1
Call-ID: call-1
CSeq: 1 ACK
Content-Length: 0


----------------------------------------------- 2026-01-01 10:00:00.000005
UDP message received [200] bytes :

INVITE sip:1@127.0.0.1:5070 SIP/2.0
v: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-2
f: <sip:a@127.0.0.1>;tag=a1
t: <sip:1@127.0.0.1>;tag=b1
i: call-1
CSeq: 2 INVITE
Content-Length: 0

"""


def test_report_parsing_collapses_retransmissions() -> None:
    msgs = parse_message_log(SAMPLE_LOG)
    assert [m.summary for m in msgs] == ["INVITE", "INVITE", "486 INVITE", "ACK", "INVITE"]
    assert [m.direction for m in msgs] == ["received", "received", "sent", "received", "received"]
    report = SippReport.from_log(SAMPLE_LOG)
    assert (report.invites, report.reinvites, report.acks, report.byes, report.cancels) == (
        1,
        1,
        1,
        0,
        0,
    )
    assert report.sent == ("486 INVITE",)
    assert report.received == ("INVITE", "ACK", "INVITE")
    assert report.call_ids == ("call-1",)
    assert report.raw == SAMPLE_LOG
    assert SippReport.from_log("") == SippReport(0, 0, 0, 0)


def test_ulaw_tone_file(tmp_path: Path) -> None:
    path = write_ulaw_tone(tmp_path / "t.ulaw", 1000.0, seconds=1.0)
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    assert len(data) == 8000
    # 8 samples per cycle at 1 kHz / 8 kHz: the pattern repeats exactly
    assert np.array_equal(data[:8], data[8:16])


def test_phone_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SippPhone("nonsense", tmp_path)
    phone = SippPhone("echo", tmp_path)
    assert phone.uri("555") == f"sip:555@127.0.0.1:{phone.port}"
    assert phone.uri(42) == f"sip:42@127.0.0.1:{phone.port}"
    assert phone.port != phone.media_port


# --------------------------------------------------------------------------
# sipp against the pjsua2 caller
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_echo_mode_echoes_audio(tmp_path: Path) -> None:
    async with SippPhone("echo", tmp_path) as phone:
        pid = phone.pid
        assert pid is not None
        rec = tmp_path / "echo.wav"
        res = await run_caller(
            phone.uri(1000), "--tone", "1000", "--record", str(rec), "--hangup-after", "3"
        )
        end = res.end()
        assert end["connected"] and end["local_hangup"], res.describe()
        assert res.returncode == 0, res.describe()
        assert_tone(rec, 1000.0)
        report = await phone.wait_for(lambda r: r.byes == 1, timeout=5)
        assert (report.invites, report.acks, report.byes, report.cancels) == (1, 1, 1, 0)
        assert "200 BYE" in report.sent
        assert "180 INVITE" in report.sent and "200 INVITE" in report.sent
    assert phone.running is False
    assert process_gone(pid)


@pytest.mark.asyncio
async def test_echo_mode_is_silent_without_caller_audio(tmp_path: Path) -> None:
    """Guard for the echo test: what we record really is the echo."""
    async with SippPhone("echo", tmp_path) as phone:
        rec = tmp_path / "quiet.wav"
        res = await run_caller(phone.uri(1000), "--record", str(rec), "--hangup-after", "2")
        assert res.end()["connected"], res.describe()
        _, rms, _ = analyse(rec)
        assert rms < 100


@pytest.mark.asyncio
async def test_tone_mode_plays_1khz(tmp_path: Path) -> None:
    async with SippPhone("tone", tmp_path) as phone:
        rec = tmp_path / "tone.wav"
        res = await run_caller(phone.uri("tone"), "--record", str(rec), "--hangup-after", "3")
        end = res.end()
        assert end["connected"] and end["local_hangup"], res.describe()
        assert_tone(rec, 1000.0)
        report = await phone.wait_for(lambda r: r.byes == 1, timeout=5)
        assert (report.invites, report.acks) == (1, 1)


@pytest.mark.asyncio
async def test_busy_mode(tmp_path: Path) -> None:
    async with SippPhone("busy", tmp_path) as phone:
        res = await run_caller(phone.uri(486))
        end = res.end()
        assert end["code"] == 486, res.describe()
        assert not end["connected"] and not end["local_hangup"]
        report = await phone.wait_for(lambda r: r.acks == 1, timeout=5)
        assert report.invites == 1 and report.byes == 0
        assert report.sent == ("100 INVITE", "486 INVITE")


@pytest.mark.asyncio
async def test_bye_mode_hangs_up(tmp_path: Path) -> None:
    async with SippPhone("bye", tmp_path, bye_after_ms=1000) as phone:
        res = await run_caller(phone.uri(200), timeout=15)
        end = res.end()
        assert end["connected"], res.describe()
        assert not end["local_hangup"], "the caller should have been hung up on"
        assert res.returncode == 0, res.describe()
        report = await phone.wait_for(lambda r: "200 BYE" in r.received, timeout=5)
        assert report.sent_count("BYE") == 1
        assert (report.invites, report.acks, report.byes) == (1, 1, 0)


@pytest.mark.asyncio
async def test_ring_mode_sees_cancel(tmp_path: Path) -> None:
    async with SippPhone("ring", tmp_path) as phone:
        res = await run_caller(phone.uri(180), "--hangup-after", "1")
        end = res.end()
        assert end["code"] == 487 and not end["connected"], res.describe()
        report = await phone.wait_for(lambda r: r.cancels == 1 and r.acks == 1, timeout=5)
        assert report.invites == 1 and report.byes == 0
        assert "200 CANCEL" in report.sent and "487 INVITE" in report.sent


@pytest.mark.asyncio
async def test_answer_wait_bye_mode_sees_bye(tmp_path: Path) -> None:
    async with SippPhone("answer_wait_bye", tmp_path) as phone:
        res = await run_caller(phone.uri(1), "--hangup-after", "1.5")
        end = res.end()
        assert end["connected"] and end["local_hangup"] and end["code"] == 200, res.describe()
        report = await phone.wait_for(lambda r: r.byes == 1, timeout=5)
        assert (report.invites, report.acks, report.cancels) == (1, 1, 0)
        assert "200 BYE" in report.sent


@pytest.mark.asyncio
async def test_five_concurrent_calls_to_one_echo_phone(tmp_path: Path) -> None:
    async with SippPhone("echo", tmp_path, calls=5) as phone:
        uri = phone.uri(5)
        common = ("--tone", "1000", "--hangup-after", "3")
        a, b = await asyncio.gather(
            run_caller(uri, "--calls", "3", "--record", str(tmp_path / "a.wav"), *common),
            run_caller(uri, "--calls", "2", "--record", str(tmp_path / "b.wav"), *common),
        )
        ends = a.ends() + b.ends()
        assert len(ends) == 5, a.describe() + "\n" + b.describe()
        assert all(e["connected"] and e["code"] == 200 for e in ends), (
            a.describe() + "\n" + b.describe()
        )
        for e in ends:
            assert_tone(e["record"], 1000.0)
        report = await phone.wait_for(lambda r: r.byes == 5, timeout=5)
        assert report.invites == 5 and report.acks == 5
        assert len(set(report.call_ids)) == 5


@pytest.mark.asyncio
async def test_wait_for_times_out_with_log(tmp_path: Path) -> None:
    async with SippPhone("busy", tmp_path) as phone:
        await run_caller(phone.uri(486))
        with pytest.raises(TimeoutError, match="486 Busy Here"):
            await phone.wait_for(lambda r: r.byes == 1, timeout=0.3)
