"""A controllable SIP phone (UAS) made of pjsua2, in a process of its own.

The gateway's worker calls it like any phone; a test drives it from the side
through :class:`PjsuaPhone`::

    async with PjsuaPhone(tmp_path, tone_hz=700) as phone:
        call = await client.establish("c1", f"sipp{phone.port}", tone_hz=1000)
        await phone.wait_confirmed()
        heard = await phone.wait_for_tone(1000)      # what the phone receives
        held = await phone.hold()                    # re-INVITE, a=sendonly
        assert held.remote_dir == "recvonly"         # the gateway's answer
        await phone.resume()

The phone binds SIP/UDP and RTP to 127.0.0.1 only (RTP in the port range it is
given), answers every INVITE (optionally with a 180 first), plays a steady sine
into the call and keeps the last 2 s of what it receives (16 kHz mono).

With an ``account`` (:class:`SipAccount`) it also registers to a registrar with
digest credentials and sends its requests through an outbound proxy (by default the
registrar), as a desk phone on a PBX does; it can then place calls too::

    account = SipAccount("1002", "secret", kam.registrar, domain=kam.realm)
    async with PjsuaPhone(tmp_path, account=account) as phone:
        await phone.wait_registered()                # a 200 to its REGISTER
        await phone.call("sip:1003@sipgw.test")      # through the proxy

With ``tls`` (:class:`PhoneTls`) it also listens for SIP over TLS on a port of its
own (``tls_port``) with the certificate it is given, as a PBX's TLS listener
does; ``srtp`` makes it offer and take SDES-keyed SRTP (``"mandatory"``: RTP/SAVP
only, plain RTP is refused with 488)::

    tls = PhoneTls(cert="phone.pem", key="phone.key")
    async with PjsuaPhone(tmp_path, tls=tls, srtp="mandatory") as phone:
        ...                                          # call sip:x@127.0.0.1:<tls_port>
        incoming = await phone.wait_event("incoming")
        assert incoming["transport"] == "TLS"        # the INVITE's top Via
        media = await phone.wait_confirmed()
        assert media.srtp.startswith("Active")       # pjsua's SRTP status

The process (``python tests/peers/pjsua_phone.py --port 0 ...``) is driven by
JSON lines on stdin and reports JSON lines on stdout.

Commands (``{"cmd": ..., "id": ...}``; every command gets one reply
``{"event": "reply", "id": ..., "ok": true|false, ...}``):

``measure`` (``seconds``, default 1.0)
    dominant frequency (numpy FFT) and RMS of the last ``seconds`` received.
``hold`` / ``resume`` / ``inactive`` / ``move_port`` / ``codec`` (``name``)
    send a re-INVITE: ``a=sendonly`` (``Call.setHold``), ``a=sendrecv``
    (``PJSUA_CALL_UNHOLD``), ``a=inactive`` (``PJSUA_CALL_SET_MEDIA_DIR``), a new
    RTP socket on another port (``PJSUA_CALL_REINIT_MEDIA``), or an offer with
    only that codec. The reply says the re-INVITE went out; its outcome comes as
    ``{"event": "reinvite", "id": ..., "code": 200, "media": {...}}``.
``call`` (``uri``)
    place a call (INVITE) from the phone's account; the reply says it went out.
``register`` (``renew``, default true)
    REGISTER again now, or unregister (``renew`` false: Expires 0).
``hangup``, ``status``, ``quit``.

Events: ``ready`` (``port``, ``tls_port``), ``reg`` (``code``, ``reason``, ``expiration``: the
outcome of every REGISTER transaction, 0 expiration once unregistered),
``incoming`` (``transport``: the protocol of the INVITE's top Via, ``UDP`` or
``TLS``), ``state``, ``confirmed``, ``dtmf`` (``digit``: one the far end sent), ``media``
(after every media change: the media status, pjsua's direction, the codec, the
local RTP port, pjsua's SRTP status and the last local and remote SDP:
direction, port, codecs, profile, SDES crypto suites),
``reinvite``, ``disconnected`` (``code``, ``reason``), ``error``.

pjsua2 is touched by the main thread only (``threadCnt = 0``,
``mainThreadOnly = True``): it alternates between ``libHandleEvents`` and the
commands a reader thread takes off stdin. The receiving port's
``onFrameReceived`` runs on pjmedia's clock thread and only copies the frame
into a preallocated ring.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import gc
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

HOST = "127.0.0.1"
CLOCK_RATE = 16000
PTIME_MS = 20
FRAME_SAMPLES = CLOCK_RATE * PTIME_MS // 1000
RING_SECONDS = 2
#: Codec ids as pjsua2 names them.
CODEC_IDS = {"PCMU": "PCMU/8000/1", "PCMA": "PCMA/8000/1", "G722": "G722/16000/1"}
_STATIC_PT = {0: "PCMU", 8: "PCMA", 9: "G722", 101: "telephone-event"}
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


# ==========================================================================
# SDP: what the wire said (shared by the phone and the tests)
# ==========================================================================


def sdp_of(message: str) -> str:
    """The SDP body of a whole SIP message, or ``""``."""
    head, sep, body = message.replace("\r\n", "\n").partition("\n\n")
    if not sep or "application/sdp" not in head.lower():
        return ""
    return body.strip()


def via_transport(message: str) -> str:
    """The transport of a SIP message's top Via (``UDP``, ``TLS``...), or ``""``."""
    for line in message.replace("\r\n", "\n").split("\n")[1:]:
        if not line.strip():
            break
        name, _, value = line.partition(":")
        if name.strip().lower() in ("via", "v"):
            protocol = value.strip().split(None, 1)[0] if value.strip() else ""
            return protocol.rsplit("/", 1)[-1].upper()
    return ""


def sdp_audio(sdp: str) -> dict[str, Any] | None:
    """Direction, port, codecs, profile and keys of the first ``m=audio`` of ``sdp``.

    ``None`` without one. The direction is the media-level attribute, else the
    session-level one, else ``sendrecv`` (RFC 3264). ``proto`` is the transport
    profile (``RTP/AVP``, ``RTP/SAVP``), ``crypto`` the suites of its SDES
    ``a=crypto`` lines (RFC 4568), keys left out.
    """
    session_dir = "sendrecv"
    audio: dict[str, Any] | None = None
    media_dir: str | None = None
    in_audio = False
    rtpmap: dict[int, str] = {}
    pts: list[int] = []
    for line in sdp.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if line.startswith("m="):
            if audio is not None:
                break  # only the first audio stream
            fields = line[2:].split()
            in_audio = bool(fields) and fields[0] == "audio"
            if in_audio:
                port = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
                pts = [int(p) for p in fields[3:] if p.isdigit()]
                proto = fields[2] if len(fields) > 2 else ""
                audio = {"port": port, "proto": proto, "crypto": []}
            continue
        if line.startswith("a="):
            attr = line[2:]
            if attr in _DIRECTIONS:
                if audio is None:
                    session_dir = attr
                elif in_audio:
                    media_dir = attr
            elif in_audio and audio is not None and attr.startswith("crypto:"):
                suite = attr[7:].split()
                if len(suite) > 1:
                    audio["crypto"].append(suite[1])
            elif in_audio and attr.startswith("rtpmap:"):
                pt, _, rest = attr[7:].partition(" ")
                if pt.isdigit():
                    rtpmap[int(pt)] = rest.split("/")[0]
    if audio is None:
        return None
    audio["dir"] = media_dir or session_dir
    audio["codecs"] = [rtpmap.get(pt) or _STATIC_PT.get(pt, str(pt)) for pt in pts]
    return audio


# ==========================================================================
# the driver (test side, asyncio)
# ==========================================================================

_START_TIMEOUT_S = 20.0
_QUIT_GRACE_S = 3.0
#: Phone processes we started and have not reaped (process group ids); killed at exit.
_LIVE: dict[int, asyncio.subprocess.Process] = {}


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the phone's process group (it leads one of its own), if still there."""
    if proc.returncode is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    _LIVE.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        _kill_group(proc)


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Have the kernel SIGKILL the phone if the test process dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class PhoneError(RuntimeError):
    """The phone refused a command, exited, or did not report in time."""


@dataclass(frozen=True)
class SipAccount:
    """A registering account for the phone: AoR ``sip:<user>@<domain>``.

    ``domain`` defaults to the registrar's host; ``proxy`` (outbound proxy, every
    request goes through it) to the registrar with ``;lr``; ``proxy=None`` sends
    requests straight to their URI. ``expires`` is the Expires the phone asks for
    (the registrar may shorten it; pjsua refreshes 5 s before the end, at most
    every 5 s), ``retry`` the seconds before it tries again after a REGISTER that
    timed out or met a server error. pjsua does not try again by itself after its
    credentials were refused (401 or 403 to them): :meth:`PjsuaPhone.register` does.
    """

    user: str
    password: str
    registrar: str
    domain: str = ""
    proxy: str | None = ""
    expires: int = 300
    retry: int = 60

    def args(self) -> list[str]:
        out = [
            "--user", self.user,
            "--password", self.password,
            "--registrar", self.registrar,
            "--reg-expires", str(self.expires),
            "--reg-retry", str(self.retry),
        ]  # fmt: skip
        if self.domain:
            out += ["--domain", self.domain]
        if self.proxy is None:
            out += ["--no-proxy"]
        elif self.proxy:
            out += ["--proxy", self.proxy]
        return out


@dataclass(frozen=True)
class PhoneTls:
    """A TLS listener for the phone: its certificate chain and key (PEM files).

    ``client_ca``: the phone asks the gateway for a client certificate and wants
    one this CA signed (mutual TLS); empty: no client certificate asked for.
    ``nodelay``: TCP_NODELAY on its TLS connections. Off, pjsip's default, the
    kernel holds each small write (180 after 100 Trying, 200 after 180) until the
    previous one is acknowledged, and the gateway's delayed ACK makes that ~40 ms
    (``bench/sip_tls.py`` shows it).
    """

    cert: str
    key: str
    client_ca: str = ""
    nodelay: bool = True

    def args(self) -> list[str]:
        out = ["--tls-cert", self.cert, "--tls-key", self.key]
        if self.client_ca:
            out += ["--tls-client-ca", self.client_ca]
        if not self.nodelay:
            out.append("--tls-nagle")
        return out


@dataclass(frozen=True)
class Media:
    """One ``media`` snapshot of the phone's call (see :func:`_media_snapshot`)."""

    raw: dict[str, Any]

    @property
    def status(self) -> str:
        """pjsua's media status: ``ACTIVE``, ``LOCAL_HOLD``, ``REMOTE_HOLD``, ``NONE``."""
        return str(self.raw.get("status", ""))

    @property
    def local_dir(self) -> str:
        """Direction of the phone's last SDP (offer or answer) as sent."""
        return str((self.raw.get("local_sdp") or {}).get("dir", ""))

    @property
    def remote_dir(self) -> str:
        """Direction of the gateway's last SDP as received."""
        return str((self.raw.get("remote_sdp") or {}).get("dir", ""))

    @property
    def local_port(self) -> int:
        """The RTP port of the phone's last SDP."""
        return int((self.raw.get("local_sdp") or {}).get("port", 0))

    @property
    def remote_port(self) -> int:
        return int((self.raw.get("remote_sdp") or {}).get("port", 0))

    @property
    def rtp_port(self) -> int:
        """The port of the phone's RTP socket now in use (from pjsua's transport)."""
        return int(self.raw.get("rtp_port", 0))

    @property
    def codec(self) -> str:
        """The stream's codec, e.g. ``PCMU``."""
        return str(self.raw.get("codec", ""))

    @property
    def remote_codecs(self) -> list[str]:
        return list((self.raw.get("remote_sdp") or {}).get("codecs", []))

    @property
    def srtp(self) -> str:
        """pjsua's SRTP status of the stream (``"Active Crypto-suite: ..."``), or ``""``."""
        return str(self.raw.get("srtp", ""))


@dataclass(frozen=True)
class Heard:
    """What the phone measured: dominant frequency (Hz) and RMS (of full scale)."""

    hz: float
    rms: float
    #: seconds since the last audio frame reached the phone's receiving port
    age: float


@dataclass
class _Events:
    items: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class PjsuaPhone:
    """The pjsua2 phone process on 127.0.0.1; an async context manager.

    ``port`` is its SIP/UDP port once started (``tls_port`` its SIP/TLS port,
    with ``tls``); ``events`` every event it
    reported, in order. Leaving the context quits the phone (SIGKILL of its
    process group if it does not exit within 3 s); :meth:`kill` SIGKILLs it at
    once, as a phone that dies would.
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        tone_hz: float = 700.0,
        ring: bool = True,
        early_media: bool = False,
        answer_delay_ms: int = 0,
        codecs: tuple[str, ...] = ("PCMU", "PCMA"),
        rtp_span: int = 40,
        log_level: int = 4,
        account: SipAccount | None = None,
        tls: PhoneTls | None = None,
        srtp: str = "off",
    ) -> None:
        self.tone_hz = tone_hz
        self.ring = ring
        self.early_media = early_media
        self.answer_delay_ms = answer_delay_ms
        self.codecs = codecs
        self.rtp_span = rtp_span
        self.log_level = log_level
        self.account = account
        self.tls = tls
        self.srtp = srtp
        self.tls_port = 0
        self.workdir = _make_workdir(Path(tmp_path))
        self.log_path = self.workdir / "pjsip.log"
        self.stderr_path = self.workdir / "stderr.txt"
        self.port = 0
        self.rtp_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr: Any = None
        self._events = _Events()
        self._next_id = 0

    # -- lifecycle --------------------------------------------------------------

    def command_line(self) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            "0",
            "--rtp-port",
            str(self.rtp_port),
            "--rtp-range",
            str(self.rtp_span),
            "--tone",
            str(self.tone_hz),
            "--codecs",
            ",".join(self.codecs),
            "--answer-delay-ms",
            str(self.answer_delay_ms),
            "--log",
            str(self.log_path),
            "--log-level",
            str(self.log_level),
            *(["--ring"] if self.ring else []),
            *(["--early-media"] if self.early_media else []),
            *(self.account.args() if self.account else []),
            *(self.tls.args() if self.tls else []),
            "--srtp",
            self.srtp,
        ]

    async def start(self) -> PjsuaPhone:
        if self._proc is not None:
            raise RuntimeError("PjsuaPhone already started")
        from peers.sipp import free_udp_port  # the test side only (tests/ on sys.path)

        last: Exception | None = None
        for _ in range(3):  # the RTP block may be taken between picking and binding
            self.rtp_port = free_udp_port(self.rtp_span)
            while self.rtp_port % 2:
                self.rtp_port = free_udp_port(self.rtp_span)
            try:
                await self._spawn()
                return self
            except PhoneError as exc:
                last = exc
                await self.stop()
        assert last is not None
        raise last

    async def _spawn(self) -> None:
        self._stderr = open(self.stderr_path, "ab")
        self._events = _Events()
        self._proc = await asyncio.create_subprocess_exec(
            *self.command_line(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,
            limit=1 << 20,
        )
        _LIVE[self._proc.pid] = self._proc
        self._reader = asyncio.create_task(self._read(self._proc))
        ready = await self.wait_event("ready", timeout=_START_TIMEOUT_S)
        self.port = int(ready["port"])
        self.tls_port = int(ready.get("tls_port", 0))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "garbage", "line": line.decode(errors="replace")}
            self._events.items.append(event)
            self._events.changed.set()
        await proc.wait()
        self._events.items.append({"event": "exit", "code": proc.returncode})
        self._events.changed.set()

    async def stop(self) -> None:
        """Quit the phone (BYE for a call still up), SIGKILL after 3 s; safe to call twice."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(Exception):
                    assert proc.stdin is not None
                    proc.stdin.write(b'{"cmd": "quit"}\n')
                    await proc.stdin.drain()
                try:
                    await asyncio.wait_for(proc.wait(), _QUIT_GRACE_S)
                except TimeoutError:
                    _kill_group(proc)
                    await proc.wait()
            if proc is not None:
                _kill_group(proc)  # anything it left in its group
        except BaseException:
            if proc is not None:
                _kill_group(proc)
            raise
        finally:
            if self._reader is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(self._reader, 2)
                self._reader = None
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    async def kill(self) -> None:
        """SIGKILL the phone at once: no BYE, its RTP just stops."""
        proc = self._proc
        if proc is None:
            return
        _kill_group(proc)
        await proc.wait()

    async def __aenter__(self) -> PjsuaPhone:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def events(self) -> list[dict[str, Any]]:
        return self._events.items

    def uri(self, number: str | int) -> str:
        return f"sip:{number}@{HOST}:{self.port}"

    def tls_uri(self, number: str | int) -> str:
        """The phone's address over TLS (``;transport=tls``, its TLS port)."""
        return f"sip:{number}@{HOST}:{self.tls_port};transport=tls"

    # -- events -----------------------------------------------------------------

    async def wait_event(
        self,
        kind: str | Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        start: int = 0,
    ) -> dict[str, Any]:
        """The first event from index ``start`` of ``kind`` (a name or a predicate)."""
        match = kind if callable(kind) else (lambda e: e.get("event") == kind)
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events.items[start:]:
                if match(event):
                    return event
                if event.get("event") == "exit":
                    raise PhoneError(self._failure(f"phone exited (code {event.get('code')})"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PhoneError(self._failure(f"no {kind!r} event within {timeout}s"))
            self._events.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events.changed.wait(), remaining)

    def _failure(self, what: str) -> str:
        events = "\n".join(json.dumps(e) for e in self._events.items[-30:])
        return (
            f"{what}\n--- phone events (last 30) ---\n{events}\n"
            f"--- stderr (tail) ---\n{_tail(self.stderr_path)}\n"
            f"--- pjsip log (tail) ---\n{_tail(self.log_path, 4000)}"
        )

    async def command(self, cmd: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send one command; return its reply (raises :class:`PhoneError` if not ok)."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise PhoneError("phone not running")
        self._next_id += 1
        request_id = f"q{self._next_id}"
        start = len(self._events.items)
        proc.stdin.write((json.dumps({"cmd": cmd, "id": request_id, **fields}) + "\n").encode())
        await proc.stdin.drain()
        reply = await self.wait_event(
            lambda e: e.get("event") == "reply" and e.get("id") == request_id, timeout, start
        )
        if not reply.get("ok"):
            raise PhoneError(self._failure(f"{cmd} refused: {reply}"))
        return reply

    async def wait_confirmed(self, timeout: float = 15.0) -> Media:
        """Wait until a call is CONFIRMED; returns its media as of then."""
        await self.wait_event("confirmed", timeout)
        return Media(await self.wait_event("media", timeout))

    async def wait_disconnected(self, timeout: float = 15.0) -> dict[str, Any]:
        return await self.wait_event("disconnected", timeout)

    async def _reinvite(self, cmd: str, timeout: float = 15.0, **fields: Any) -> Media:
        reply = await self.command(cmd, timeout, **fields)
        done = await self.wait_event(
            lambda e: e.get("event") == "reinvite" and e.get("id") == reply["id"], timeout
        )
        if done.get("code") != 200:
            raise PhoneError(self._failure(f"{cmd}: re-INVITE answered {done.get('code')}"))
        return Media(done["media"])

    async def hold(self) -> Media:
        """re-INVITE with ``a=sendonly`` (pjsua2 ``Call.setHold``)."""
        return await self._reinvite("hold")

    async def resume(self) -> Media:
        """re-INVITE with ``a=sendrecv`` (``PJSUA_CALL_UNHOLD``)."""
        return await self._reinvite("resume")

    async def inactive(self) -> Media:
        """re-INVITE with ``a=inactive`` (``PJSUA_CALL_SET_MEDIA_DIR``, direction none)."""
        return await self._reinvite("inactive")

    async def move_port(self) -> Media:
        """re-INVITE from a new RTP socket on another port (``PJSUA_CALL_REINIT_MEDIA``)."""
        return await self._reinvite("move_port")

    async def set_codec(self, name: str) -> Media:
        """re-INVITE offering ``name`` (``PCMU``, ``PCMA``, ``G722``) alone."""
        return await self._reinvite("codec", name=name)

    async def hangup(self) -> None:
        await self.command("hangup")

    async def xfer(self, uri: str) -> None:
        """Send REFER to ``uri`` on the current call (the far end reports back in NOTIFYs)."""
        await self.command("xfer", uri=uri)

    async def call(self, uri: str) -> None:
        """Place a call to ``uri``; wait for it with :meth:`wait_confirmed`."""
        await self.command("call", uri=uri)

    def digits(self) -> str:
        """Every DTMF digit the phone received so far, in order."""
        return "".join(e["digit"] for e in self._events.items if e.get("event") == "dtmf")

    def reg_events(self) -> list[dict[str, Any]]:
        """The outcome of every REGISTER so far (``code``, ``reason``, ``expiration``)."""
        return [e for e in self._events.items if e.get("event") == "reg"]

    async def wait_registered(self, timeout: float = 10.0, start: int = 0) -> dict[str, Any]:
        """The first ``reg`` event from event index ``start`` with a 200 and an expiration."""
        return await self.wait_event(
            lambda e: e.get("event") == "reg" and e.get("code") == 200 and e["expiration"] > 0,
            timeout,
            start,
        )

    async def register(self, renew: bool = True) -> None:
        """REGISTER again now (``renew=False``: unregister); outcome in a ``reg`` event."""
        await self.command("register", renew=renew)

    async def status(self) -> dict[str, Any]:
        return await self.command("status")

    async def measure(self, seconds: float = 1.0) -> Heard:
        reply = await self.command("measure", seconds=seconds)
        return Heard(float(reply["hz"]), float(reply["rms"]), float(reply["age"]))

    async def wait_for_tone(
        self, hz: float, timeout: float = 8.0, tolerance: float = 10.0, min_rms: float = 0.02
    ) -> Heard:
        """Measure until the last second is ``hz`` with real energy, or ``timeout`` passes.

        Returns the last measurement either way; the caller asserts on it.
        """
        deadline = time.monotonic() + timeout
        while True:
            heard = await self.measure(1.0)
            if abs(heard.hz - hz) <= tolerance and heard.rms > min_rms:
                return heard
            if time.monotonic() > deadline:
                return heard
            await asyncio.sleep(0.25)

    async def wait_for_silence(self, timeout: float = 8.0, max_rms: float = 0.005) -> Heard:
        """Measure until the last second is (near) silent, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            heard = await self.measure(1.0)
            if heard.rms < max_rms or time.monotonic() > deadline:
                return heard
            await asyncio.sleep(0.25)


def _make_workdir(tmp_path: Path) -> Path:
    for i in range(1000):
        d = tmp_path / f"pjsua-phone-{i}"
        try:
            d.mkdir(parents=True)
        except FileExistsError:
            continue
        return d
    raise RuntimeError(f"cannot create a phone work directory under {tmp_path}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ==========================================================================
# the phone process
# ==========================================================================


def dominant_frequency(pcm: np.ndarray, rate: int) -> tuple[float, float]:
    """Dominant frequency (Hz) and RMS (of full scale) of mono s16 ``pcm``."""
    if len(pcm) < rate // 10:
        return 0.0, 0.0
    x = pcm.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[:5] = 0  # DC
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(freqs[spectrum.argmax()]), float(np.sqrt((x**2).mean()) / 32767)


def _run_phone(args: argparse.Namespace) -> int:
    # pjsua2 is imported here only: the test process imports this module for the driver.
    import pjsua2 as pj

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # pjlib may print to stdout; stdout is for the JSON events only
    out_lock = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        with out_lock:
            out.write(
                json.dumps({"event": event, "t": round(time.monotonic(), 3), **fields}) + "\n"
            )

    status_names = {
        pj.PJSUA_CALL_MEDIA_NONE: "NONE",
        pj.PJSUA_CALL_MEDIA_ACTIVE: "ACTIVE",
        pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "LOCAL_HOLD",
        pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "REMOTE_HOLD",
        pj.PJSUA_CALL_MEDIA_ERROR: "ERROR",
    }
    dir_names = {
        pj.PJMEDIA_DIR_NONE: "none",
        pj.PJMEDIA_DIR_ENCODING: "encoding",
        pj.PJMEDIA_DIR_DECODING: "decoding",
        pj.PJMEDIA_DIR_ENCODING_DECODING: "encoding_decoding",
    }
    state_names = {
        pj.PJSIP_INV_STATE_NULL: "NULL",
        pj.PJSIP_INV_STATE_CALLING: "CALLING",
        pj.PJSIP_INV_STATE_INCOMING: "INCOMING",
        pj.PJSIP_INV_STATE_EARLY: "EARLY",
        pj.PJSIP_INV_STATE_CONNECTING: "CONNECTING",
        pj.PJSIP_INV_STATE_CONFIRMED: "CONFIRMED",
        pj.PJSIP_INV_STATE_DISCONNECTED: "DISCONNECTED",
    }

    def data_pointer(vector: Any) -> int:
        """Address of a ``std::vector<unsigned char>``'s storage (libstdc++: first member)."""
        return int(ctypes.c_void_p.from_address(int(vector.this)).value or 0)

    probe = bytes(range(256))
    try:
        fast = ctypes.string_at(data_pointer(pj.ByteVector(probe)), 256) == probe
    except (ValueError, TypeError, OSError):
        fast = False

    class Receiver(pj.AudioMediaPort):  # type: ignore[misc]
        """Keeps the last ``RING_SECONDS`` of what the call plays to it (clock thread)."""

        def __init__(self) -> None:
            super().__init__()
            self.ring = np.zeros(CLOCK_RATE * RING_SECONDS, dtype=np.int16)
            self.ring_bytes = self.ring.nbytes
            self.ring_address = self.ring.ctypes.data
            self.pos = 0  # byte offset of the next write
            self.last_audio = 0.0

        def onFrameReceived(self, frame: Any) -> None:
            if frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO:
                # no audio this tick (nothing transmits, or the stream is held): silence
                n = FRAME_SAMPLES * 2
                ctypes.memset(self.ring_address + self.pos, 0, min(n, self.ring_bytes - self.pos))
                self.pos = (self.pos + n) % self.ring_bytes
                return
            buf = frame.buf
            n = buf.size()
            if n <= 0 or n % 2 or n > self.ring_bytes:
                return
            if fast:
                src = data_pointer(buf)
                first = min(n, self.ring_bytes - self.pos)
                ctypes.memmove(self.ring_address + self.pos, src, first)
                if first < n:
                    ctypes.memmove(self.ring_address, src + first, n - first)
            else:
                data = bytes(buf)
                first = min(n, self.ring_bytes - self.pos)
                ctypes.memmove(self.ring_address + self.pos, data, first)
                if first < n:
                    ctypes.memmove(self.ring_address, data[first:], n - first)
            self.pos = (self.pos + n) % self.ring_bytes
            self.last_audio = time.monotonic()

        def onFrameRequested(self, frame: Any) -> None:
            frame.type = pj.PJMEDIA_FRAME_TYPE_NONE

        def last(self, seconds: float) -> np.ndarray:
            samples = min(len(self.ring), int(seconds * CLOCK_RATE))
            ordered = np.roll(self.ring, -(self.pos // 2))
            return ordered[len(ordered) - samples :].copy()

    class Phone:
        """The phone's state; everything here runs on the main thread."""

        def __init__(self) -> None:
            self.calls: list[PhoneCall] = []
            self.to_answer: list[tuple[float, PhoneCall]] = []
            self.media_changed: set[PhoneCall] = set()
            #: re-INVITEs sent and not yet answered: call -> command id
            self.pending: dict[PhoneCall, str] = {}
            #: re-INVITEs answered this turn: (call, command id, status code)
            self.answered: list[tuple[PhoneCall, str, int]] = []
            #: what plays into every call, and what keeps what every call plays
            self.tone: Any = None
            self.receiver: Receiver | None = None
            #: the phone's one account (places the calls of the ``call`` command)
            self.account: Any = None

        @property
        def call(self) -> PhoneCall | None:
            live = [c for c in self.calls if not c.disconnected]
            return live[-1] if live else None

    phone = Phone()

    class PhoneCall(pj.Call):  # type: ignore[misc]
        def __init__(self, account: Any, call_id: int) -> None:
            super().__init__(account, call_id)
            self.disconnected = False
            self.local_sdp: dict[str, Any] | None = None
            self.remote_sdp: dict[str, Any] | None = None
            self.audio: list[Any] = []  # AudioMedia objects we connected (kept alive)
            self.rang = False

        def onCallState(self, prm: Any) -> None:
            info = self.getInfo()
            state = state_names.get(info.state, str(info.state))
            emit("state", state=state, code=info.lastStatusCode, reason=info.lastReason)
            if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
                emit("confirmed", call_id=info.callIdString)
            elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.disconnected = True
                emit("disconnected", code=info.lastStatusCode, reason=info.lastReason)
                pending = phone.pending.pop(self, None)
                if pending is not None:
                    emit("reinvite", id=pending, code=info.lastStatusCode, media=None)
                # Let go here: pjsua may give this call id to the next call as soon
                # as this returns, and a Call deleted later would hang that one up.
                self.audio.clear()
                phone.media_changed.discard(self)
                phone.to_answer[:] = [(t, c) for t, c in phone.to_answer if c is not self]
                if self in phone.calls:
                    phone.calls.remove(self)

        def onCallTsxState(self, prm: Any) -> None:
            """Record every SDP that goes out or comes in on an INVITE transaction."""
            event = prm.e.body.tsxState
            tsx = event.tsx
            if tsx.method != "INVITE":
                return
            if event.type == pj.PJSIP_EVENT_RX_MSG:
                audio = sdp_audio(sdp_of(event.src.rdata.wholeMsg))
                if audio is not None:
                    self.remote_sdp = audio
            elif event.type == pj.PJSIP_EVENT_TX_MSG or tsx.state == pj.PJSIP_TSX_STATE_CALLING:
                msg = event.src.tdata.wholeMsg if event.type == pj.PJSIP_EVENT_TX_MSG else ""
                audio = sdp_audio(sdp_of(msg or tsx.lastTx.wholeMsg))
                if audio is not None:
                    self.local_sdp = audio
            if (
                tsx.role == pj.PJSIP_ROLE_UAC
                and tsx.statusCode >= 200
                and self in phone.pending
                and tsx.state in (pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_TSX_STATE_TERMINATED)
            ):
                phone.answered.append((self, phone.pending.pop(self), tsx.statusCode))

        def onCallSdpCreated(self, prm: Any) -> None:
            # Fallback only: hold and direction changes are applied after this
            # callback, so the SDP on the wire (onCallTsxState) wins when seen.
            if prm.remSdp.wholeSdp:
                audio = sdp_audio(prm.remSdp.wholeSdp)
                if audio is not None:
                    self.remote_sdp = audio

        def onCallMediaState(self, prm: Any) -> None:
            # (Re)connect on every change: pjsua may recreate the stream and its
            # conference port on any re-INVITE; a duplicate connect is ignored.
            info = self.getInfo()
            for media in info.media:
                if media.type != pj.PJMEDIA_TYPE_AUDIO:
                    continue
                if media.status in (pj.PJSUA_CALL_MEDIA_NONE, pj.PJSUA_CALL_MEDIA_ERROR):
                    continue
                audio = self.getAudioMedia(media.index)
                phone.tone.startTransmit(audio)
                audio.startTransmit(phone.receiver)
                self.audio = [audio]
            phone.media_changed.add(self)

        def onCallTransferRequest(self, prm: Any) -> None:
            """Accept a REFER (202) and place its call with a Call of our own."""
            emit("refer", uri=prm.dstUri)
            new = PhoneCall(phone.account, pj.PJSUA_INVALID_ID)
            phone.calls.append(new)
            prm.newCall = new

        def onDtmfDigit(self, prm: Any) -> None:
            """A digit the far end sent (RFC 4733 or SIP INFO)."""
            emit("dtmf", digit=prm.digit, method=str(prm.method))

        def onCallTransferStatus(self, prm: Any) -> None:
            """NOTIFYs about a REFER this phone sent (``xfer`` command)."""
            emit("xfer_status", code=prm.statusCode, reason=prm.reason, final=prm.finalNotify)

        def onCallReplaced(self, prm: Any) -> None:
            """An INVITE with Replaces took this call's place: keep the new one."""
            new = PhoneCall(phone.account, prm.newCallId)
            phone.calls.append(new)
            prm.newCall = new
            emit("replaced")

        def media_snapshot(self) -> dict[str, Any]:
            info = self.getInfo()
            snap: dict[str, Any] = {
                "status": "NONE",
                "local_sdp": self.local_sdp,
                "remote_sdp": self.remote_sdp,
            }
            for media in info.media:
                if media.type != pj.PJMEDIA_TYPE_AUDIO:
                    continue
                snap["status"] = status_names.get(media.status, str(media.status))
                snap["dir"] = dir_names.get(media.dir, str(media.dir))
                snap["conf_slot"] = media.audioConfSlot
                with contextlib.suppress(pj.Error):
                    stream = self.getStreamInfo(media.index)
                    snap["codec"] = stream.codecName
                    snap["remote_rtp"] = stream.remoteRtpAddress
                with contextlib.suppress(pj.Error):
                    tp = self.getMedTransportInfo(media.index)
                    snap["rtp_port"] = int(tp.localRtpName.rsplit(":", 1)[1])
                # pjsua's call dump is where the SRTP transport's state shows:
                # "SRTP status: Active Crypto-suite: AES_CM_128_HMAC_SHA1_80".
                with contextlib.suppress(pj.Error):
                    for line in self.dump(True, "").splitlines():
                        if "SRTP status:" in line:
                            snap["srtp"] = line.split("SRTP status:", 1)[1].strip()
                break
            return snap

    class PhoneAccount(pj.Account):  # type: ignore[misc]
        def onRegState(self, prm: Any) -> None:
            emit("reg", code=prm.code, reason=prm.reason, expiration=prm.expiration)

        def onIncomingCall(self, prm: Any) -> None:
            call = PhoneCall(self, prm.callId)
            phone.calls.append(call)
            info = call.getInfo()
            remote = sdp_audio(sdp_of(prm.rdata.wholeMsg))
            call.remote_sdp = remote
            emit(
                "incoming",
                remote_uri=info.remoteUri,
                local_uri=info.localUri,
                remote_sdp=remote,
                transport=via_transport(prm.rdata.wholeMsg),
            )
            # Answered on the loop's next turn, outside this callback.
            phone.to_answer.append((time.monotonic() + args.answer_delay_ms / 1000, call))

    # ---- start the stack ------------------------------------------------------------
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.maxCalls = 4
    cfg.uaConfig.userAgent = "sipgw-test-pjsua-phone"
    cfg.logConfig.consoleLevel = 0
    cfg.logConfig.level = args.log_level if args.log else 0
    if args.log:
        cfg.logConfig.filename = args.log
    cfg.medConfig.clockRate = CLOCK_RATE
    cfg.medConfig.sndClockRate = CLOCK_RATE
    cfg.medConfig.audioFramePtime = PTIME_MS
    cfg.medConfig.ecTailLen = 0
    cfg.medConfig.noVad = True
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()

    def set_codecs(names: list[str]) -> None:
        wanted = {CODEC_IDS[n]: 250 - i for i, n in enumerate(names)}
        for codec in ep.codecEnum2():
            ep.codecSetPriority(codec.codecId, wanted.get(codec.codecId, 0))

    set_codecs(args.codecs.split(","))
    tcfg = pj.TransportConfig()
    tcfg.boundAddress = HOST
    tcfg.publicAddress = HOST
    tcfg.port = args.port
    transport = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    sip_port = int(ep.transportGetInfo(transport).localName.rsplit(":", 1)[1])
    tls_port, tls_transport = 0, -1
    if args.tls_cert:
        tls_cfg = pj.TransportConfig()
        tls_cfg.boundAddress = HOST
        tls_cfg.publicAddress = HOST
        tls_cfg.port = 0
        tls_cfg.tlsConfig.certFile = args.tls_cert
        tls_cfg.tlsConfig.privKeyFile = args.tls_key
        tls_cfg.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
        tls_cfg.tlsConfig.proto = pj.PJ_SSL_SOCK_PROTO_TLS1_2
        if args.tls_client_ca:
            tls_cfg.tlsConfig.CaListFile = args.tls_client_ca
            tls_cfg.tlsConfig.verifyClient = True
            tls_cfg.tlsConfig.requireClientCert = True
        if not args.tls_nagle:
            option = pj.SockOpt()
            option.level = socket.IPPROTO_TCP
            option.optName = socket.TCP_NODELAY
            option.setOptValInt(1)
            options = pj.SockOptParams()
            options.sockOpts.append(option)
            tls_cfg.tlsConfig.sockOptParams = options
        tls_transport = ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tls_cfg)
        tls_port = int(ep.transportGetInfo(tls_transport).localName.rsplit(":", 1)[1])
    ep.libStart()

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:phone@{HOST}:{sip_port}"
    # With TLS the account is the TLS listener's (its Contact names the TLS port).
    acfg.sipConfig.transportId = tls_transport if args.tls_cert else transport
    if args.registrar:
        domain = args.domain or args.registrar.split(":", 1)[1].split(";")[0]
        acfg.idUri = f"sip:{args.user}@{domain}"
        acfg.regConfig.registrarUri = args.registrar
        acfg.regConfig.timeoutSec = args.reg_expires
        acfg.regConfig.retryIntervalSec = args.reg_retry
        acfg.regConfig.firstRetryIntervalSec = args.reg_retry
        cred = pj.AuthCredInfo("digest", "*", args.user, 0, args.password)
        acfg.sipConfig.authCreds.append(cred)
        if not args.no_proxy:
            acfg.sipConfig.proxies.append(args.proxy or f"{args.registrar};lr")
    acfg.mediaConfig.transportConfig.boundAddress = HOST
    acfg.mediaConfig.transportConfig.publicAddress = HOST
    acfg.mediaConfig.transportConfig.port = args.rtp_port
    acfg.mediaConfig.transportConfig.portRange = args.rtp_range
    acfg.mediaConfig.lockCodecEnabled = False
    acfg.mediaConfig.srtpUse = {
        "off": pj.PJMEDIA_SRTP_DISABLED,
        "optional": pj.PJMEDIA_SRTP_OPTIONAL,
        "mandatory": pj.PJMEDIA_SRTP_MANDATORY,
    }[args.srtp]
    # The phone takes SDES keys over any transport: which transport carries them
    # is the gateway's business, and what the tests check.
    acfg.mediaConfig.srtpSecureSignaling = 0
    keyings = pj.IntVector()
    keyings.append(pj.PJMEDIA_SRTP_KEYING_SDES)
    acfg.mediaConfig.srtpOpt.keyings = keyings
    account = phone.account = PhoneAccount()
    account.create(acfg, True)

    receiver = phone.receiver = Receiver()
    fmt = pj.MediaFormatAudio()
    fmt.init(pj.PJMEDIA_FORMAT_PCM, CLOCK_RATE, 1, PTIME_MS * 1000, 16)
    receiver.createPort("receiver", fmt)
    tone = phone.tone = pj.ToneGenerator()
    tone.createToneGenerator(CLOCK_RATE, 1)
    desc = pj.ToneDesc()
    desc.freq1 = int(args.tone)
    desc.freq2 = 0
    desc.on_msec = 30000
    desc.off_msec = 0
    desc.volume = 0
    tones = pj.ToneDescVector()
    tones.append(desc)
    tone.play(tones, True)

    # ---- commands -------------------------------------------------------------------
    commands: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                command = json.loads(line)
                if not isinstance(command, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                emit("error", what=f"bad command line: {exc}", line=line[:200])
                continue
            commands.put(command)
        commands.put(None)  # stdin closed: the driver is gone

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()

    def reinvite(call: PhoneCall, request_id: str, op: Any, hold: bool = False) -> dict[str, Any]:
        if call in phone.pending:
            return {"ok": False, "error": "a re-INVITE is already under way"}
        before = call.media_snapshot()
        if hold:
            call.setHold(op)
        else:
            call.reinvite(op)
        phone.pending[call] = request_id
        return {"ok": True, "before": before}

    def media_dir_op(direction: int, flags: int) -> Any:
        op = pj.CallOpParam(True)
        op.opt.flag = flags | pj.PJSUA_CALL_SET_MEDIA_DIR
        dirs = pj.IntVector()
        dirs.append(direction)
        op.opt.mediaDir = dirs
        return op

    def handle(command: dict[str, Any]) -> dict[str, Any] | None:
        """Run one command; returns the reply fields, or None to quit."""
        name = command.get("cmd")
        rid = str(command.get("id", ""))
        if name == "quit":
            return None
        if name == "measure":
            seconds = float(command.get("seconds", 1.0))
            ring = phone.receiver
            assert ring is not None
            hz, rms = dominant_frequency(ring.last(seconds), CLOCK_RATE)
            age = time.monotonic() - ring.last_audio if ring.last_audio else -1.0
            return {"ok": True, "hz": hz, "rms": rms, "age": round(age, 3)}
        if name == "codecs":
            set_codecs(list(command.get("names", [])))
            return {"ok": True}
        if name == "call":
            outgoing = PhoneCall(phone.account, pj.PJSUA_INVALID_ID)
            outgoing.makeCall(str(command.get("uri", "")), pj.CallOpParam(True))
            phone.calls.append(outgoing)
            return {"ok": True}
        if name == "register":
            phone.account.setRegistration(bool(command.get("renew", True)))
            return {"ok": True}
        call = phone.call
        if name == "status":
            return {"ok": True, "call": call.media_snapshot() if call else None}
        if call is None:
            return {"ok": False, "error": "no call"}
        if name == "hangup":
            call.hangup(pj.CallOpParam(True))
            return {"ok": True}
        if name == "hold":
            return reinvite(call, rid, pj.CallOpParam(True), hold=True)
        if name == "resume":
            # sendrecv again, whatever held it: setHold, or a direction we set
            return reinvite(
                call,
                rid,
                media_dir_op(pj.PJMEDIA_DIR_ENCODING_DECODING, pj.PJSUA_CALL_UNHOLD),
            )
        if name == "inactive":
            return reinvite(call, rid, media_dir_op(pj.PJMEDIA_DIR_NONE, 0))
        if name == "move_port":
            op = pj.CallOpParam(True)
            op.opt.flag = pj.PJSUA_CALL_REINIT_MEDIA
            return reinvite(call, rid, op)
        if name == "xfer":
            call.xfer(str(command.get("uri", "")), pj.CallOpParam(True))
            return {"ok": True}
        if name == "codec":
            codec = str(command.get("name", ""))
            if codec not in CODEC_IDS:
                return {"ok": False, "error": f"unknown codec {codec!r}"}
            set_codecs([codec])
            return reinvite(call, rid, pj.CallOpParam(True))
        return {"ok": False, "error": f"unknown command {name!r}"}

    def answer_due() -> None:
        """180 for a new call (with ``--ring``), 200 once its delay is over."""
        now = time.monotonic()
        for entry in list(phone.to_answer):
            at, call = entry
            if call.disconnected:
                continue
            if (args.ring or args.early_media) and not call.rang:
                call.rang = True
                op = pj.CallOpParam(True)
                op.statusCode = 183 if args.early_media else 180
                call.answer(op)
            if at > now or call.disconnected:
                continue
            if entry in phone.to_answer:  # answered once, even if it raises
                phone.to_answer.remove(entry)
            op = pj.CallOpParam(True)
            op.statusCode = 200
            call.answer(op)

    emit(
        "ready",
        port=sip_port,
        tls_port=tls_port,
        rtp_port=args.rtp_port,
        rtp_range=args.rtp_range,
        pid=os.getpid(),
    )

    # ---- the loop -------------------------------------------------------------------
    def report_changes() -> None:
        """Media and re-INVITE outcomes of this turn, once every callback has run."""
        for changed in list(phone.media_changed):
            phone.media_changed.discard(changed)
            if not changed.disconnected:
                emit("media", **changed.media_snapshot())
        for answered, rid, code in phone.answered:
            media = answered.media_snapshot() if not answered.disconnected else None
            emit("reinvite", id=rid, code=code, media=media)
        phone.answered.clear()

    def run_commands() -> bool:
        """Run the queued commands; False once told to quit (or stdin closed)."""
        while True:
            try:
                command = commands.get_nowait()
            except queue.Empty:
                return True
            if command is None:
                return False
            try:
                reply = handle(command)
            except pj.Error as exc:
                reply = {"ok": False, "error": exc.info()}
            except Exception as exc:  # a bad command must not kill the phone
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if reply is None:
                emit("reply", id=command.get("id"), ok=True)
                return False
            emit("reply", id=command.get("id"), **reply)

    def hang_up_all() -> None:
        for live in list(phone.calls):
            with contextlib.suppress(pj.Error):
                live.hangup(pj.CallOpParam(True))
        end = time.monotonic() + 2.0
        while phone.calls and time.monotonic() < end:
            ep.libHandleEvents(10)
        # no Call may outlive libDestroy (its destructor would assert)
        phone.calls.clear()
        phone.media_changed.clear()
        phone.pending.clear()
        phone.answered.clear()
        phone.to_answer.clear()

    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        while not terminated:
            ep.libHandleEvents(10)
            try:
                answer_due()
            except pj.Error as exc:
                emit("error", what="answer", info=exc.info())
            report_changes()
            if not run_commands():
                break
    finally:
        hang_up_all()
        with contextlib.suppress(pj.Error):
            tone.stop()
        for _ in range(10):  # let the conference bridge apply the disconnects
            ep.libHandleEvents(10)
        phone.tone = phone.receiver = None
        del tone, receiver
        account.shutdown()
        phone.account = None
        del account
        gc.collect()
        ep.libDestroy()
        emit("exit")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="a pjsua2 phone (UAS) driven by JSON lines")
    ap.add_argument("--port", type=int, default=0, help="SIP/UDP port on 127.0.0.1 (0: any)")
    ap.add_argument("--rtp-port", type=int, default=0, help="first RTP port (0: any)")
    ap.add_argument("--rtp-range", type=int, default=40, help="RTP ports after --rtp-port")
    ap.add_argument("--tone", type=float, default=700.0, help="tone played into calls (Hz)")
    ap.add_argument("--codecs", default="PCMU,PCMA", help="codecs offered, in order")
    ap.add_argument("--ring", action="store_true", help="send 180 Ringing before the 200")
    ap.add_argument(
        "--early-media", action="store_true", help="183 with SDP (the tone plays) before the 200"
    )
    ap.add_argument("--answer-delay-ms", type=int, default=0, help="answer this much later")
    ap.add_argument("--log", default=None, help="pjsip log file")
    ap.add_argument("--log-level", type=int, default=4, help="pjsip log level for --log")
    ap.add_argument("--registrar", default="", help="register there (e.g. sip:127.0.0.1:5060)")
    ap.add_argument("--user", default="phone", help="the account's user (and digest user)")
    ap.add_argument("--password", default="", help="digest password")
    ap.add_argument("--domain", default="", help="AoR domain (default: the registrar's host)")
    ap.add_argument("--proxy", default="", help="outbound proxy (default: registrar;lr)")
    ap.add_argument("--no-proxy", action="store_true", help="no outbound proxy")
    ap.add_argument("--reg-expires", type=int, default=300, help="Expires asked for")
    ap.add_argument("--reg-retry", type=int, default=60, help="seconds between failed REGISTERs")
    ap.add_argument("--tls-cert", default="", help="listen for SIP over TLS with this cert (PEM)")
    ap.add_argument("--tls-key", default="", help="the private key of --tls-cert (PEM)")
    ap.add_argument("--tls-client-ca", default="", help="require a client cert this CA signed")
    ap.add_argument("--tls-nagle", action="store_true", help="no TCP_NODELAY on TLS connections")
    ap.add_argument(
        "--srtp", choices=("off", "optional", "mandatory"), default="off", help="SDES SRTP use"
    )
    args = ap.parse_args(argv)
    for name in args.codecs.split(","):
        if name not in CODEC_IDS:
            ap.error(f"unknown codec {name!r}")
    return _run_phone(args)


if __name__ == "__main__":
    sys.exit(main())
