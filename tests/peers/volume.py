"""Many short calls through a running gateway, and the memory of each of its processes.

Used by ``tests/e2e/test_volume.py`` and ``bench/volume.py``. Calls go to one
number (a sipp ``echo`` phone serves them all), at most ``concurrency`` at a time,
one WebSocket connection per lane. Each call: offer, ``answer``, ``accepted``, the
first audio back, ``audio_seconds`` more of it, a check that the browser hears
its own tone (each lane sends its own frequency, so crossed audio shows), the
browser's ``hangup`` and its reply. A ``busy`` refusal (set-up pacing, or a slot
pjsua has not freed yet) is retried after a short back-off and counted; any
other refusal, an early ``hangup`` or a missing reply is a failure.

Nothing here waits on a fixed delay for the gateway: every step waits for the
message or the audio it needs, with a generous bound, so the set-up may take
longer (e.g. an INVITE sent only once ICE/DTLS is up) without changing anything.

At each checkpoint (calls completed) the lanes stop, the gateway drains to zero
live calls and every slot free, and the RSS of each gateway process is sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCSessionDescription

from .gateway import Gateway
from .webclient import ClientCall, WebClient

TOLERANCE_HZ = 15.0
MIN_RMS = 0.02


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_kb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def gateway_processes(gateway: Gateway) -> dict[str, int]:
    """Every process of the gateway by role: ``front``, ``worker0``, ``targets0``, ...

    Found by walking /proc from the front's pid; the roles come from the gateway's log.
    Multiprocessing's resource tracker is ``tracker``; any other descendant is
    ``other<pid>``.
    """
    front = gateway.process.pid
    roles = {front: "front"}
    for kind in ("worker", "targets"):
        for i, pid in enumerate(gateway.pids(kind)):
            if pid is not None:
                roles[pid] = f"{kind}{i}"
    found: dict[str, int] = {}
    for pid in process_tree(front):
        role = roles.get(pid)
        if role is None:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            role = "tracker" if b"resource_tracker" in cmdline else f"other{pid}"
        found[role] = pid
    return found


def sample_rss(gateway: Gateway) -> dict[str, tuple[int, int]]:
    """``{role: (pid, VmRSS in kB)}`` for every gateway process."""
    sample: dict[str, tuple[int, int]] = {}
    for role, pid in gateway_processes(gateway).items():
        kb = rss_kb(pid)
        if kb is not None:
            sample[role] = (pid, kb)
    return sample


@dataclass
class VolumeResult:
    calls: int
    concurrency: int
    completed: int = 0
    #: one line per failed call: what went wrong, at which step
    failures: list[str] = field(default_factory=list)
    #: ``busy`` refusals retried, by the refusal's message
    busy: Counter[str] = field(default_factory=Counter)
    #: calls whose browser did not hear its own tone back
    wrong_tone: list[str] = field(default_factory=list)
    #: seconds spent placing calls (checkpoint drains and samples excluded)
    calling_seconds: float = 0.0
    #: seconds from the first call to the last sample, drains included
    total_seconds: float = 0.0
    #: call request -> ``accepted``, per completed call
    setup_seconds: list[float] = field(default_factory=list)
    #: checkpoint (calls completed) -> {role: (pid, kB)}
    rss: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)

    @property
    def busy_total(self) -> int:
        return sum(self.busy.values())

    @property
    def calls_per_second(self) -> float:
        return self.completed / self.calling_seconds if self.calling_seconds else 0.0


class _Failed(Exception):
    pass


async def _end(client: WebClient, call: ClientCall) -> None:
    """Release everything the client holds for ``call``."""
    call.tone.stop()
    if call.recorder is not None:
        call.recorder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await call.recorder
    await call.pc.close()
    client.calls.pop(call.call_id, None)


async def _one_call(
    client: WebClient,
    lane: int,
    index: int,
    number: str,
    hz: float,
    audio_seconds: float,
    result: VolumeResult,
) -> None:
    step = "offer"
    attempt = 0
    start = time.monotonic()
    while True:
        attempt += 1
        call_id = f"v{index}-{attempt}"
        # Messages of earlier calls are not needed any more: keep the scan short.
        client.messages.clear()
        start = time.monotonic()
        call = await client.call(call_id, number, hz)
        try:
            step = "answer"
            first = await client.wait_event(call, ("answer", "error", "hangup"), timeout=30)
            if first["type"] == "error" and first.get("code") == "busy" and attempt < 200:
                result.busy[str(first.get("message", ""))] += 1
                await asyncio.sleep(min(0.5, 0.05 * attempt))
                continue
            if first["type"] != "answer":
                raise _Failed(f"refused: {first}")
            await call.pc.setRemoteDescription(RTCSessionDescription(first["sdp"], "answer"))
            step = "accepted"
            event = await client.wait_event(call, ("accepted", "hangup"), timeout=30)
            if event["type"] != "accepted":
                raise _Failed(f"ended before it was answered: {event}")
            result.setup_seconds.append(time.monotonic() - start)
            step = "first audio"
            deadline = time.monotonic() + 15
            while call.first_audio is None:
                if time.monotonic() > deadline:
                    raise _Failed("no audio within 15 s of accepted")
                await asyncio.sleep(0.02)
            step = "audio"
            await asyncio.sleep(audio_seconds)
            early = [e for e in call.events if e["type"] in ("hangup", "error")]
            if early:
                raise _Failed(f"ended before the browser hung up: {early}")
            tone = call.measure(min(0.5, audio_seconds))
            if abs(tone.hz - hz) > TOLERANCE_HZ or tone.rms <= MIN_RMS:
                result.wrong_tone.append(f"call {index} lane {lane}: sent {hz} Hz, heard {tone}")
            step = "hangup"
            reply = await client.hangup(call_id)
            if (reply["type"], reply.get("by")) != ("hangup", "local"):
                raise _Failed(f"hangup reply {reply}")
            result.completed += 1
            return
        except _Failed as failure:
            result.failures.append(f"call {index} (lane {lane}, attempt {attempt}): {failure}")
            with contextlib.suppress(Exception):
                await client.request({"type": "hangup", "call": call_id}, timeout=5)
            return
        except TimeoutError as timeout:
            result.failures.append(
                f"call {index} (lane {lane}, attempt {attempt}): timed out waiting for "
                f"{step}: {str(timeout)[:300]}"
            )
            with contextlib.suppress(Exception):
                await client.request({"type": "hangup", "call": call_id}, timeout=5)
            return
        finally:
            await _end(client, call)


async def drain(gateway: Gateway, slots: int, timeout: float = 45.0) -> None:
    """Wait until the gateway has no live call and every slot is free again.

    A slot held by an INVITE that got no response frees only after Timer B (32 s).
    """
    deadline = time.monotonic() + timeout
    while True:
        health = await asyncio.to_thread(gateway.health)
        if health["calls_active"] == 0 and health["call_slots_free"] == slots:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway did not drain: {health}")
        await asyncio.sleep(0.2)


async def run_volume(
    gateway: Gateway,
    number: str,
    *,
    calls: int = 1000,
    concurrency: int = 8,
    audio_seconds: float = 1.0,
    checkpoints: tuple[int, ...] = (100, 1000),
    slots: int = 8,
    base_hz: float = 500.0,
    step_hz: float = 100.0,
    progress: Any = None,
) -> VolumeResult:
    """Place ``calls`` calls to ``number``; sample RSS at each checkpoint (see module doc)."""
    result = VolumeResult(calls, concurrency)
    bounds = sorted({c for c in checkpoints if 0 < c <= calls} | {calls})
    clients = [WebClient(gateway.url) for _ in range(concurrency)]
    for client in clients:
        await client.connect()
    began = time.monotonic()
    try:
        done = 0
        for bound in bounds:
            queue = iter(range(done, bound))

            async def lane(n: int, queue: Any = queue) -> None:
                hz = base_hz + step_hz * n  # lanes never share a frequency
                for index in queue:
                    await asyncio.wait_for(
                        _one_call(clients[n], n, index, number, hz, audio_seconds, result),
                        timeout=120,
                    )

            segment = time.monotonic()
            await asyncio.gather(*(lane(n) for n in range(concurrency)))
            result.calling_seconds += time.monotonic() - segment
            done = bound
            await drain(gateway, slots)
            await asyncio.sleep(1.0)  # let freed memory settle the same way each time
            result.rss[bound] = await asyncio.to_thread(sample_rss, gateway)
            if progress is not None:
                progress(bound, result)
    finally:
        result.total_seconds = time.monotonic() - began
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
    return result


def rss_table(result: VolumeResult) -> list[str]:
    """One line per process: its RSS at each checkpoint and the growth from the first."""
    marks = sorted(result.rss)
    roles = sorted({role for sample in result.rss.values() for role in sample})
    lines = [f"{'process':<10} {'pid':>7} " + " ".join(f"{f'@{m}':>10}" for m in marks)]
    for role in roles:
        cells, pid = [], None
        for mark in marks:
            entry = result.rss[mark].get(role)
            cells.append(f"{entry[1] / 1024:>8.1f}MB" if entry else f"{'-':>10}")
            pid = pid or (entry[0] if entry else None)
        first, last = result.rss[marks[0]].get(role), result.rss[marks[-1]].get(role)
        growth = f"  {(last[1] - first[1]) / 1024:+.1f} MB" if first and last else ""
        lines.append(f"{role:<10} {pid or '-':>7} " + " ".join(cells) + growth)
    return lines
