"""The leak gate: a gateway must hold no more after a test than before it.

``GET /debug/census`` counts what each gateway process holds (fds, threads,
asyncio tasks, UDP sockets, calls, peer connections, pjsua call slots,
WebSockets). :func:`warm_baseline` takes it before a test, once the gateway is
idle and steady; :func:`assert_no_leaks` polls it after the test until every
count is back to at most its baseline, and fails with a diff per process and
count if one is not within the settle time (40 s: pjsua's Timer B). A process
whose pid changed (a test killed it) is skipped: its successor is a new
process with counts of its own.

Why the baseline comes after a warm-up (:func:`warm_up`): a process creates
some things once, on first use, and keeps them (imported codecs, caches,
a lazily started pool); counting those as a leak of the first test that
calls would be wrong, and allowing growth in general would hide real leaks.
So every process takes one call before its first baseline, and counts must
then stay flat. The workers' encode pool is started in full with the worker
(``gateway/worker/main.py``) precisely so that its size is not a matter of
how many calls ran at once so far.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

#: Counts that are 0 on an idle gateway: a baseline is taken only once they are.
IDLE_ZERO = (
    "calls",
    "quota_calls",
    "call_owners",
    "websockets",
    "worker_slots",
    "targets_slots",
    "peer_connections",
    "pjsua_calls",
)
#: Every count the gate holds to its baseline (``rss_kb`` is not: heaps grow and stay).
GATED = ("fds", "threads", "os_threads", "tasks", "udp_sockets", *IDLE_ZERO)

#: pjsua keeps the slot of a call hung up before any response until its INVITE
#: transaction times out (Timer B, 32 s): a gate must wait that long, and no longer.
SETTLE = 40.0
POLL = 0.2

Census = dict[str, Any]


class HasUrl(Protocol):
    url: str


def census(gateway: HasUrl | str) -> Census:
    """``GET /debug/census`` of ``gateway`` (a :class:`~peers.gateway.Gateway` or its URL)."""
    url = gateway if isinstance(gateway, str) else gateway.url
    with urllib.request.urlopen(f"{url}/debug/census", timeout=5) as response:
        return dict(json.loads(response.read()))


def processes(snapshot: Census) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each process of a census, named ``front``, ``worker 0``, ``target 1``..."""
    yield "front", snapshot["front"]
    for kind in ("workers", "targets"):
        for position, entry in enumerate(snapshot[kind]):
            yield f"{kind.rstrip('s')} {entry.get('index', position)}", entry


def excess(base: Census, now: Census) -> list[str]:
    """One line per process and count above its baseline (processes restarted are skipped)."""
    before = dict(processes(base))
    lines = []
    for name, entry in processes(now):
        was = before.get(name)
        if was is None or "error" in was or entry.get("pid") != was.get("pid"):
            continue  # not there before, or not the same process any more
        if "error" in entry:
            lines.append(f"{name} (pid {entry['pid']}): no census ({entry['error']})")
            continue
        for count in GATED:
            if count in was and entry.get(count, 0) > was[count]:
                lines.append(
                    f"{name} (pid {entry['pid']}): {count} {was[count]} -> {entry[count]} "
                    f"(+{entry[count] - was[count]})"
                    + (_new_tasks(was, entry) if count == "tasks" else "")
                )
    return lines


def _new_tasks(was: dict[str, Any], now: dict[str, Any]) -> str:
    """The coroutines with more pending tasks than before, as ``": name +n, ..."``."""
    before, after = was.get("task_names", {}), now.get("task_names", {})
    more = [f"{n} +{after[n] - before.get(n, 0)}" for n in after if after[n] > before.get(n, 0)]
    return f": {', '.join(more)}" if more else ""


def busy(snapshot: Census) -> list[str]:
    """The counts that should be 0 on an idle gateway and are not."""
    return [
        f"{name}: {count} = {entry[count]}"
        for name, entry in processes(snapshot)
        for count in IDLE_ZERO
        if entry.get(count, 0)
    ]


def gated(snapshot: Census) -> dict[str, tuple[Any, ...]]:
    """The pid and gated counts of each process: what must not move while idle."""
    return {
        name: (entry.get("pid"), *(entry.get(count) for count in GATED))
        for name, entry in processes(snapshot)
    }


#: Censuses in a row, ``POLL`` apart, that must agree before one is a baseline.
STEADY = 3


def baseline(gateway: HasUrl | str, settle: float = SETTLE) -> Census:
    """The census once the gateway is idle and steady (nothing left from before,
    every process answering, the same counts ``STEADY`` times in a row)."""
    deadline = time.monotonic() + settle
    recent: list[dict[str, tuple[Any, ...]]] = []
    while True:
        snapshot = census(gateway)
        answered = not any("error" in e for _, e in processes(snapshot))
        recent = [*recent, gated(snapshot)][-STEADY:] if answered and not busy(snapshot) else []
        if len(recent) == STEADY and all(r == recent[0] for r in recent):
            return snapshot
        if time.monotonic() > deadline:
            raise AssertionError(
                f"gateway not idle and steady {settle:.0f} s before the test: "
                f"{busy(snapshot)} {json.dumps(snapshot)}"
            )
        time.sleep(POLL)


def settled(
    gateway: HasUrl | str, base: Census, settle: float = SETTLE, poll: float = POLL
) -> tuple[list[str], Census, float]:
    """Poll until no count exceeds ``base``: the excess left (none when settled), the last
    census, and the seconds it took."""
    started = time.monotonic()
    while True:
        snapshot = census(gateway)
        lines = excess(base, snapshot)
        waited = time.monotonic() - started
        if not lines or waited > settle:
            return lines, snapshot, waited
        time.sleep(poll)


def assert_no_leaks(
    gateway: HasUrl | str, base: Census, settle: float = SETTLE, what: str = "the test"
) -> Census:
    """Fail unless every count of every process is back to at most ``base`` within ``settle``."""
    lines, snapshot, waited = settled(gateway, base, settle)
    if lines:
        raise AssertionError(
            f"{what} left the gateway holding more than before ({waited:.1f} s after it ended):\n  "
            + "\n  ".join(lines)
            + f"\nbefore: {json.dumps(base)}\nafter:  {json.dumps(snapshot)}"
        )
    return snapshot


def pids(snapshot: Census) -> set[int]:
    return {e["pid"] for _, e in processes(snapshot) if e.get("pid")}


#: The pids warmed up so far, by gateway URL.
_warmed: dict[str, set[int]] = {}
#: The lowest gated counts each process had at a baseline, by gateway URL and pid.
_lowest: dict[str, dict[int, dict[str, int]]] = {}


def warm_baseline(gateway: HasUrl | str, settle: float = SETTLE) -> Census:
    """The :func:`baseline`, after a :func:`warm_up` if a process has not had a call yet
    (a new gateway, or one whose worker or targets process was restarted), each count
    lowered to the lowest the same process had at an earlier baseline.

    Lowered because a count can be briefly high on an idle gateway: pjsua closes
    its (null) sound device, and the device's clock thread with it, 1 s after the
    last call. A baseline taken in that second would let a test leak a thread.
    Nothing runs between tests, so an idle count never rises legitimately.
    """
    url = gateway if isinstance(gateway, str) else gateway.url
    snapshot = baseline(url, settle)
    if not pids(snapshot) <= _warmed.get(url, set()):
        warm_up(url)
        snapshot = baseline(url, settle)
        _warmed[url] = pids(snapshot)
    lowest = _lowest.setdefault(url, {})
    for _, entry in processes(snapshot):
        seen = lowest.setdefault(entry["pid"], {})
        for count in GATED:
            if count in entry:
                entry[count] = seen[count] = min(entry[count], seen.get(count, entry[count]))
    return snapshot


def warm_up(gateway: HasUrl | str, calls: int | None = None) -> None:
    """Place one echo call on each worker and targets process at once, then hang up.

    Calls go to the least loaded worker and targets process, so ``calls`` at
    once (default: as many as there are workers or targets processes, whichever
    is more) reach every one. Runs its own event loop on a thread of its own,
    so that it can be called from sync fixtures of async tests.
    """
    snapshot = census(gateway)
    count = calls or max(len(snapshot["workers"]), len(snapshot["targets"]), 1)
    url = gateway if isinstance(gateway, str) else gateway.url
    with ThreadPoolExecutor(1, thread_name_prefix="warm-up") as thread:
        thread.submit(asyncio.run, _warm_up(url, count)).result()


async def _warm_up(url: str, count: int) -> None:
    from peers.webclient import WebClient  # aiortc: only where a call is placed

    async with WebClient(url) as client:
        calls = [await client.establish(f"warm-up-{i}", "echo") for i in range(count)]
        for call in calls:
            await client.wait_event(call, "accepted", timeout=15)
        for call in calls:
            await call.wait_for_tone(1000)
        for call in calls:
            await client.hangup(call.call_id)
