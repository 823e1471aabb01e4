"""Run ``sipp`` as the *phone* (a UAS) that a SIP user agent under test calls.

Usage::

    async with SippPhone("echo", tmp_path) as phone:
        target = phone.uri("1000")          # sip:1000@127.0.0.1:<port>
        ...  # make the UA under test call ``target``
        report = await phone.wait_for(lambda r: r.byes >= 1, timeout=10)

Modes (scenario files in ``tests/peers/scenarios/``):

``echo``
    100, 180, 200 + SDP (PCMU, PCMA); RTP is echoed back (``-rtp_echo``);
    waits for BYE and answers 200.
``answer_wait_bye``
    180, 200 + SDP, ACK, RTP echo, waits for the caller's BYE.
``pbx_bye_challenge``
    a registrar and phone in one: REGISTER gets 401 (realm ``sipgw.test``) then
    200; an INVITE gets 200 + SDP (RTP echo); the caller's BYE gets 407 with realm
    ``bye_realm`` (default ``evil.example``); a second BYE within 4 s gets 200.
``bye``
    180, 200 + SDP, ACK, RTP echo; after ``bye_after_ms`` sipp sends BYE and
    expects 200 (a BYE from the caller before that is answered too).
``busy``
    100, then 486 Busy Here; receives the ACK.
``ring``
    100, 180 and never answers; on CANCEL: 200 (CANCEL), 487 (INVITE), ACK.
``late``
    like ``echo``, but rings ``answer_after_ms`` (45 s) before the 200.
``timer_ignore``
    200 with ``Session-Expires: 90;refresher=uac`` (re-INVITE refreshes); never
    answers the refresh; answers BYE.
``timer_422``
    422 (``Min-SE: 120``) to the first INVITE, then answers the retry with the
    Session-Expires it carries (refresher uas).
``dtmf``
    like ``echo`` with telephone-event on payload type ``dtmf_pt`` (120, what
    pjsua offers) and the SDP's RTP port ``rtp_port`` (default: sipp's echo
    port, a test may listen there itself); 1.5 s after the ACK
    sends INFO digit 7 (dtmf-relay), then an INFO with a text/plain body.
``tone``
    100, 200 + SDP (PCMU only); after the ACK streams a steady ``tone_hz``
    tone (PCMU, 20 ms packets) to the RTP address of the caller's SDP, until
    BYE.  Uses sipp's ``<exec rtp_stream=...>`` with a raw 8 kHz mu-law file
    generated at run time.

All sockets are bound to 127.0.0.1.  Every scenario serves any number of
concurrent calls; in-dialog re-INVITE / UPDATE offers are answered (PCMU if
offered, else PCMA) and INFO / OPTIONS / NOTIFY get an automatic 200 (``-aa``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import dataclasses
import errno
import math
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

MODES = (
    "echo",
    "pbx_bye_challenge",
    "busy",
    "bye",
    "ring",
    "answer_wait_bye",
    "tone",
    "late",
    "timer_ignore",
    "timer_422",
    "dtmf",
)
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
HOST = "127.0.0.1"

# Modes that echo RTP (sipp binds -mp and -mp+2 for the echo).
_ECHO_MODES = {
    "echo",
    "pbx_bye_challenge",
    "bye",
    "answer_wait_bye",
    "late",
    "timer_ignore",
    "timer_422",
    "dtmf",
}
_TONE_FILE = "tone.ulaw"
_START_TIMEOUT_S = 10.0
_TERM_GRACE_S = 2.0


class SippNotFoundError(RuntimeError):
    """The ``sipp`` binary is not installed."""


class SippStartError(RuntimeError):
    """sipp exited or did not open its SIP socket."""


# --------------------------------------------------------------------------
# message log parsing
# --------------------------------------------------------------------------

# e.g. "UDP message received [511] bytes :" / "UDP message sent (309 bytes):"
_ENTRY_RE = re.compile(r"^(\w+) message (received|sent)\b.*$", re.MULTILINE)
_SEPARATOR_RE = re.compile(r"^-{20,}.*$", re.MULTILINE)
_COMPACT = {
    "i": "call-id",
    "v": "via",
    "t": "to",
    "f": "from",
    "l": "content-length",
    "m": "contact",
}


@dataclass(frozen=True)
class SipMessage:
    """One SIP message from sipp's message log."""

    direction: str  # "received" or "sent"
    method: str | None  # request method, None for responses
    status: int | None  # response code, None for requests
    headers: dict[str, str]  # first value of each header, lower-case names
    start_line: str

    @property
    def call_id(self) -> str:
        return self.headers.get("call-id", "")

    @property
    def cseq(self) -> str:
        return " ".join(self.headers.get("cseq", "").split())

    @property
    def cseq_method(self) -> str:
        parts = self.cseq.split()
        return parts[1].upper() if len(parts) > 1 else ""

    @property
    def branch(self) -> str:
        m = re.search(r";\s*branch=([^;,\s]+)", self.headers.get("via", ""), re.IGNORECASE)
        return m.group(1) if m else ""

    @property
    def to_tag(self) -> str:
        m = re.search(r";\s*tag=([^;,\s>]+)", self.headers.get("to", ""), re.IGNORECASE)
        return m.group(1) if m else ""

    @property
    def summary(self) -> str:
        """``"INVITE"`` for a request, ``"200 BYE"`` for a response."""
        if self.method is not None:
            return self.method
        return f"{self.status} {self.cseq_method}".strip()

    def key(self) -> tuple[str, ...]:
        """Identity used to collapse retransmissions."""
        what = self.method if self.method is not None else str(self.status)
        return (self.direction, what, self.call_id, self.cseq, self.branch)


def parse_message_log(text: str) -> list[SipMessage]:
    """Parse sipp's ``-trace_msg`` log into messages (retransmissions kept)."""
    entries = list(_ENTRY_RE.finditer(text))
    messages: list[SipMessage] = []
    for i, m in enumerate(entries):
        end = entries[i + 1].start() if i + 1 < len(entries) else len(text)
        body = text[m.end() : end]
        sep = _SEPARATOR_RE.search(body)
        if sep:
            body = body[: sep.start()]
        lines = body.replace("\r\n", "\n").split("\n")
        # skip the blank line(s) between the entry header and the message
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines:
            continue
        start = lines[0].strip()
        method: str | None = None
        status: int | None = None
        parts = start.split()
        if parts and parts[0].upper().startswith("SIP/"):
            if len(parts) < 2 or not parts[1].isdigit():
                continue
            status = int(parts[1])
        elif len(parts) >= 3 and parts[-1].upper().startswith("SIP/"):
            method = parts[0].upper()
        else:
            continue
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line.strip():
                break
            name, sep_, value = line.partition(":")
            if not sep_:
                continue
            key = name.strip().lower()
            key = _COMPACT.get(key, key)
            headers.setdefault(key, value.strip())
        messages.append(SipMessage(m.group(2), method, status, headers, start))
    return messages


@dataclass(frozen=True)
class SippReport:
    """What sipp saw, from its message log.

    Retransmissions are collapsed (a message counts once per transaction).
    ``invites`` counts dialog-creating INVITEs (no To tag), i.e. calls;
    in-dialog re-INVITEs are counted in ``reinvites``.
    """

    invites: int
    byes: int
    cancels: int
    acks: int
    raw: str = dataclasses.field(default="", repr=False)
    reinvites: int = 0
    #: distinct messages received, in order: "INVITE", "ACK", "200 BYE", ...
    received: tuple[str, ...] = ()
    #: distinct messages sent by sipp, in order: "100 INVITE", "486 INVITE", "BYE", ...
    sent: tuple[str, ...] = ()
    #: Call-IDs of the dialog-creating INVITEs, in order of arrival
    call_ids: tuple[str, ...] = ()

    @classmethod
    def from_log(cls, text: str) -> SippReport:
        seen: set[tuple[str, ...]] = set()
        received: list[str] = []
        sent: list[str] = []
        call_ids: list[str] = []
        counts = {"INVITE": 0, "BYE": 0, "CANCEL": 0, "ACK": 0}
        reinvites = 0
        for msg in parse_message_log(text):
            k = msg.key()
            if k in seen:
                continue
            seen.add(k)
            if msg.direction == "sent":
                sent.append(msg.summary)
                continue
            received.append(msg.summary)
            if msg.method == "INVITE" and msg.to_tag:
                reinvites += 1
            elif msg.method in counts:
                counts[msg.method] += 1
                if msg.method == "INVITE":
                    call_ids.append(msg.call_id)
        return cls(
            invites=counts["INVITE"],
            byes=counts["BYE"],
            cancels=counts["CANCEL"],
            acks=counts["ACK"],
            raw=text,
            reinvites=reinvites,
            received=tuple(received),
            sent=tuple(sent),
            call_ids=tuple(call_ids),
        )

    def sent_count(self, summary: str) -> int:
        """How many distinct messages with this summary sipp sent (e.g. ``"BYE"``)."""
        return self.sent.count(summary)

    def received_count(self, summary: str) -> int:
        """How many distinct messages with this summary sipp received (e.g. ``"200 BYE"``)."""
        return self.received.count(summary)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def free_udp_port(span: int = 1) -> int:
    """A UDP port on 127.0.0.1 such that ``port .. port+span-1`` are all free.

    Found by binding to port 0; the sockets are closed before returning, so
    another process may grab the port in between (callers retry on failure).
    """
    for _ in range(200):
        socks: list[socket.socket] = []
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((HOST, 0))
            base: int = s.getsockname()[1]
            if base + span > 65535:
                continue
            ok = True
            for p in range(base + 1, base + span):
                t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(t)
                try:
                    t.bind((HOST, p))
                except OSError:
                    ok = False
                    break
            if ok:
                return base
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no free block of {span} UDP ports on {HOST}")


def _udp_ports_bound() -> set[int]:
    """Local UDP ports bound on 127.0.0.1 or 0.0.0.0 (from /proc/net/udp)."""
    ports: set[int] = set()
    try:
        text = Path("/proc/net/udp").read_text()
    except OSError:
        return ports
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 2:
            continue
        addr, _, port = fields[1].partition(":")
        if addr in ("0100007F", "00000000"):
            ports.add(int(port, 16))
    return ports


def _port_bound(port: int) -> bool:
    if Path("/proc/net/udp").exists():
        return port in _udp_ports_bound()
    # Fallback: probe by binding (only used off Linux).
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST, port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        s.close()
    return False


def _linear_to_ulaw(samples: np.ndarray) -> bytes:
    """G.711 mu-law encode 16-bit linear samples."""
    x = samples.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0x00)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    exponent = np.clip(exponent, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return bytes((~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes())


def write_ulaw_tone(
    path: Path, freq_hz: float = 1000.0, seconds: float = 1.0, level_dbfs: float = -6.0
) -> Path:
    """Write a raw (headerless) 8 kHz mu-law sine tone that loops seamlessly."""
    rate = 8000
    n = int(rate * seconds)
    # whole number of cycles over the file, so looping it has no click
    cycles = max(1, round(freq_hz * n / rate))
    t = np.arange(n)
    amp = 32767 * 10 ** (level_dbfs / 20)
    pcm = np.round(amp * np.sin(2 * math.pi * cycles * t / n + math.pi / 8))
    path.write_bytes(_linear_to_ulaw(pcm))
    return path


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Have the kernel SIGTERM sipp if the test process dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


# sipp processes we started and have not reaped; killed at interpreter exit
# as a last resort
_LIVE: dict[int, asyncio.subprocess.Process] = {}


def _kill_proc(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL one sipp process we started, unless it has already exited."""
    if proc.returncode is None:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
    _LIVE.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        _kill_proc(proc)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


# --------------------------------------------------------------------------
# the phone
# --------------------------------------------------------------------------


class SippPhone:
    """sipp acting as a phone (UAS) on 127.0.0.1; an async context manager.

    Attributes: ``mode``, ``port`` (SIP/UDP), ``media_port``, ``control_port``,
    ``workdir`` (scenario, logs, tone file), ``message_log``, ``pid``,
    ``returncode``.
    """

    def __init__(
        self,
        mode: str,
        tmp_path: Path,
        *,
        calls: int = 1,
        bye_after_ms: int = 1500,
        answer_after_ms: int = 45000,
        dtmf_pt: int = 120,
        rtp_port: int | None = None,
        tone_hz: float = 1000.0,
        max_lifetime_s: float = 600.0,
        bye_realm: str = "evil.example",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown SippPhone mode {mode!r}; expected one of {MODES}")
        sipp = shutil.which("sipp")
        if sipp is None:
            raise SippNotFoundError(
                "sipp binary not found on PATH; install it "
                "(Debian/Ubuntu: apt-get install sip-tester)"
            )
        self.sipp = sipp
        self.mode = mode
        self.calls = max(1, int(calls))
        self.bye_after_ms = int(bye_after_ms)
        self.answer_after_ms = int(answer_after_ms)
        self.dtmf_pt = int(dtmf_pt)
        self.rtp_port = rtp_port
        self.tone_hz = float(tone_hz)
        self.bye_realm = bye_realm
        self.max_lifetime_s = float(max_lifetime_s)
        self.tmp_path = Path(tmp_path)
        self._proc: asyncio.subprocess.Process | None = None
        self._files: list[object] = []
        self._pick_ports()
        self.workdir = self._make_workdir()
        self.message_log = self.workdir / "messages.log"
        self.error_log = self.workdir / "errors.log"
        self.stdout_path = self.workdir / "stdout.txt"
        self.stderr_path = self.workdir / "stderr.txt"
        self.scenario_path = self.workdir / f"{mode}.xml"

    # -- setup -------------------------------------------------------------

    def _media_span(self) -> int:
        if self.mode in _ECHO_MODES:
            return 4  # -rtp_echo binds media_port and media_port + 2
        if self.mode == "tone":
            # sipp 3.6 rtp_stream sends every call's audio from media_port
            # (and binds media_port + 2 for video)
            return 4
        return 1

    def _pick_ports(self) -> None:
        span = self._media_span()
        for _ in range(100):
            port = free_udp_port()
            control = free_udp_port()
            media = free_udp_port(span)
            media_ports = range(media, media + span)
            if (
                media % 2 == 0
                and port != control
                and port not in media_ports
                and control not in media_ports
            ):
                break
        self.port, self.control_port, self.media_port = port, control, media

    def _make_workdir(self) -> Path:
        for i in range(1000):
            d = self.tmp_path / f"sipp-{self.mode}-{i}"
            try:
                d.mkdir(parents=True)
            except FileExistsError:
                continue
            return d
        raise RuntimeError(f"cannot create a sipp work directory under {self.tmp_path}")

    def _render_scenario(self) -> None:
        text = (SCENARIO_DIR / f"{self.mode}.xml").read_text()
        text = text.replace("@BYE_AFTER_MS@", str(max(1, self.bye_after_ms)))
        text = text.replace("@ANSWER_AFTER_MS@", str(max(1, self.answer_after_ms)))
        text = text.replace("@DTMF_PT@", str(self.dtmf_pt))
        text = text.replace("@RTP_PORT@", str(self.rtp_port or "[media_port]"))
        text = text.replace("@TONE_FILE@", _TONE_FILE)
        text = text.replace("@BYE_REALM@", self.bye_realm)
        self.scenario_path.write_text(text)
        if self.mode == "tone":
            write_ulaw_tone(self.workdir / _TONE_FILE, self.tone_hz)

    def command(self) -> list[str]:
        """The sipp command line (run with cwd=workdir)."""
        cmd = [
            self.sipp,
            "-sf",
            str(self.scenario_path),
            "-t",
            "u1",
            "-i",
            HOST,
            "-p",
            str(self.port),
            "-bind_local",
            "-mi",
            HOST,
            "-mp",
            str(self.media_port),
            "-ci",
            HOST,
            "-cp",
            str(self.control_port),
            # no call limit worth hitting; sipp keeps running (no -m)
            "-l",
            str(1000 + 10 * self.calls),
            "-aa",
            "-trace_msg",
            "-message_file",
            str(self.message_log),
            "-trace_err",
            "-error_file",
            str(self.error_log),
            "-nostdin",
            "-timeout",
            f"{max(1, math.ceil(self.max_lifetime_s))}s",
        ]
        if self.mode in _ECHO_MODES:
            cmd.append("-rtp_echo")
        return cmd

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> SippPhone:
        if self._proc is not None:
            raise RuntimeError("SippPhone already started")
        self._render_scenario()
        last_error: Exception | None = None
        for attempt in range(3):
            if attempt:
                # ports were probably taken between picking and binding
                self._pick_ports()
            try:
                await self._spawn()
                return self
            except SippStartError as exc:
                last_error = exc
                await self._terminate()
        assert last_error is not None
        raise last_error

    async def _spawn(self) -> None:
        out = open(self.stdout_path, "ab")
        err = open(self.stderr_path, "ab")
        self._files = [out, err]
        kwargs: dict[str, object] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True
            if os.path.exists("/proc/self"):
                kwargs["preexec_fn"] = _set_pdeathsig
        self._proc = await asyncio.create_subprocess_exec(
            *self.command(),
            cwd=str(self.workdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            **kwargs,  # type: ignore[arg-type]
        )
        _LIVE[self._proc.pid] = self._proc
        need = [self.port]
        if self.mode in _ECHO_MODES:
            need.append(self.media_port)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.returncode is not None:
                raise SippStartError(
                    self._failure_text(f"sipp exited with code {self._proc.returncode} at start")
                )
            if all(_port_bound(p) for p in need):
                return
            if time.monotonic() > deadline:
                raise SippStartError(
                    self._failure_text(f"sipp did not bind UDP {need} within {_START_TIMEOUT_S}s")
                )
            await asyncio.sleep(0.02)

    def _failure_text(self, what: str) -> str:
        return (
            f"{what}\ncommand: {' '.join(self.command())}\n"
            f"--- stderr ---\n{_tail(self.stderr_path)}\n"
            f"--- stdout (tail) ---\n{_tail(self.stdout_path, 1500)}\n"
            f"--- errors.log ---\n{_tail(self.error_log)}"
        )

    async def stop(self) -> None:
        """Stop sipp (SIGTERM, SIGKILL after 2 s); safe to call twice."""
        await self._terminate()

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), _TERM_GRACE_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        except BaseException:
            # cancelled while waiting: never leave sipp behind
            if proc is not None:
                _kill_proc(proc)
            raise
        finally:
            if proc is not None:
                self._last_returncode = proc.returncode
                _LIVE.pop(proc.pid, None)
            for f in self._files:
                with contextlib.suppress(Exception):
                    f.close()  # type: ignore[attr-defined]
            self._files = []

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            _kill_proc(proc)

    async def __aenter__(self) -> SippPhone:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._terminate()

    # -- queries -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        if self._proc is not None:
            return self._proc.returncode
        return getattr(self, "_last_returncode", None)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def uri(self, number: str | int) -> str:
        return f"sip:{number}@{HOST}:{self.port}"

    def read_log(self) -> str:
        try:
            return self.message_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def report(self) -> SippReport:
        """Re-read sipp's message log."""
        return SippReport.from_log(self.read_log())

    async def wait_for(
        self,
        predicate: Callable[[SippReport], bool],
        timeout: float = 10.0,
        *,
        interval: float = 0.05,
    ) -> SippReport:
        """Poll :meth:`report` until ``predicate(report)`` is true; return it.

        Raises TimeoutError (with the tail of the message log) otherwise.
        """
        deadline = time.monotonic() + timeout
        while True:
            report = await self.report()
            if predicate(report):
                return report
            if time.monotonic() >= deadline:
                break
            if self._proc is not None and self._proc.returncode is not None:
                report = await self.report()
                if predicate(report):
                    return report
                raise TimeoutError(
                    self._failure_text(
                        f"sipp exited (code {self._proc.returncode}) before the condition held"
                    )
                    + f"\n--- message log (tail) ---\n{report.raw[-4000:]}"
                )
            await asyncio.sleep(interval)
        raise TimeoutError(
            f"condition not met within {timeout}s; report: invites={report.invites} "
            f"reinvites={report.reinvites} acks={report.acks} byes={report.byes} "
            f"cancels={report.cancels} received={list(report.received)} sent={list(report.sent)}\n"
            f"--- sipp message log (tail) ---\n{report.raw[-4000:]}\n"
            f"--- errors.log (tail) ---\n{_tail(self.error_log, 1500)}"
        )
