"""Benchmark: N concurrent calls through the gateway to a sipp echo phone.

Starts a gateway (as an operator would, in its own processes) and a sipp UAS
that echoes RTP, places N calls from aiortc clients that each send a tone,
holds them for a while and prints:

- call set-up time (``call`` sent -> ``accepted`` received), median and worst;
- gateway CPU per call (front + workers + embedded targets, % of one core);
- late/missing frames: frames the media bridge had to replace with silence
  (missing), dropped because a consumer fell behind, and the frames the
  clients received against those expected;
- how many calls echoed the right tone back.

Usage: python bench/calls.py --calls 8 --seconds 10 [--workers 2]
Nothing here asserts on timing; it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from peers.gateway import free_port, make_config, start_gateway, stop_gateway  # noqa: E402
from peers.sipp import SippPhone  # noqa: E402
from peers.volume import process_tree  # noqa: E402
from peers.webclient import WebClient  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def frame_counters(metrics: str) -> dict[str, int]:
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r'sipgw_media_frames_total\{kind="(\w+)"\} (\d+)', metrics)
    }


async def run(calls: int, seconds: float, workers: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sipgw-bench-"))
    port = free_port()
    gateway = start_gateway(tmp, make_config(port, workers), http_port=port)
    try:
        gateway.wait_ready(workers=workers)
        async with SippPhone("echo", tmp, calls=calls) as phone:
            clients = [WebClient(gateway.url) for _ in range(calls)]
            for client in clients:
                await client.connect()
            before_frames = frame_counters(gateway.metrics())
            pids = process_tree(gateway.process.pid)
            idle0, i0 = cpu_seconds(pids), time.monotonic()
            await asyncio.sleep(3.0)
            idle_pct = (cpu_seconds(pids) - idle0) / (time.monotonic() - i0) * 100
            setup: list[float] = []

            async def place(i: int, client: WebClient) -> None:
                start = time.monotonic()
                call = await client.establish(f"b{i}", f"sipp{phone.port}", tone_hz=1000)
                event = await client.wait_event(call, ("accepted", "hangup"), timeout=30)
                if event["type"] == "accepted":
                    setup.append(time.monotonic() - start)

            await asyncio.gather(*(place(i, c) for i, c in enumerate(clients)))
            await asyncio.sleep(1.0)  # let media settle before measuring
            pids = process_tree(gateway.process.pid)
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            received0 = [c.calls[f"b{i}"].frames_received for i, c in enumerate(clients)]
            await asyncio.sleep(seconds)
            cpu1, t1 = cpu_seconds(pids), time.monotonic()
            received1 = [c.calls[f"b{i}"].frames_received for i, c in enumerate(clients)]
            good = sum(
                1
                for i, c in enumerate(clients)
                if abs(c.calls[f"b{i}"].measure(1.0).hz - 1000) <= 10
            )
            for i, client in enumerate(clients):
                await client.hangup(f"b{i}")
                await client.close()
            await asyncio.sleep(0.5)
            frames = frame_counters(gateway.metrics())
    finally:
        stop_gateway(gateway)

    window = t1 - t0
    delta = {k: frames.get(k, 0) - before_frames.get(k, 0) for k in frames}
    expected = window / 0.02 * len(setup)
    got = sum(b - a for a, b in zip(received0, received1, strict=True))
    cpu_pct = (cpu1 - cpu0) / window * 100
    print(f"sipgw bench: {calls} calls, {workers} workers, {window:.1f} s measured")
    print(f"  answered                 {len(setup)}/{calls}, right tone echoed: {good}/{calls}")
    if setup:
        print(
            f"  set-up time              median {statistics.median(setup) * 1000:.0f} ms, "
            f"worst {max(setup) * 1000:.0f} ms"
        )
    per_call = (cpu_pct - idle_pct) / max(len(setup), 1)
    print(
        f"  gateway CPU              {cpu_pct:.1f}% of a core in all (idle {idle_pct:.1f}%), "
        f"{per_call:.1f}% per call above idle"
    )
    for direction in ("uplink", "downlink"):
        total = delta.get(f"{direction}_frames", 0)
        print(
            f"  {direction:<8} frames         {total} bridged, "
            f"{delta.get(f'{direction}_missing', 0)} missing (silence played), "
            f"{delta.get(f'{direction}_dropped', 0)} dropped"
        )
    print(
        f"  client frames received   {got} of {expected:.0f} expected "
        f"({(1 - got / expected) * 100 if expected else 0:.2f}% late or missing)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.seconds, args.workers))


if __name__ == "__main__":
    main()
