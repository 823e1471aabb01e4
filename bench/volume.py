"""Benchmark: many short calls in a row, and the memory of every gateway process.

Starts a gateway (front, workers, embedded targets, as an operator would) and a
sipp phone in ``echo`` mode, then places ``--calls`` calls of ``--seconds`` of
audio each, at most ``--concurrency`` at a time (one WebSocket per lane), with the
driver the volume test uses (``tests/peers/volume.py``). At each checkpoint the
calls pause, the gateway drains, and the RSS (VmRSS) of each process is read.
Prints:

- calls completed, failures (with the first few reasons), ``busy`` refusals
  retried (by reason), calls whose browser did not hear its own tone back;
- calls per second while calling, set-up time (call request to ``accepted``);
- RSS of each process at each checkpoint, and its growth from the first.

Usage: python bench/volume.py --calls 1000 --checkpoints 100,500,1000
Nothing here asserts; it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from peers.gateway import free_port, make_config, start_gateway, stop_gateway  # noqa: E402
from peers.sipp import SippPhone  # noqa: E402
from peers.volume import VolumeResult, rss_table, run_volume  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sipgw-volume-"))
    port = free_port()
    gateway = start_gateway(tmp, make_config(port, args.workers), http_port=port)
    checkpoints = tuple(int(c) for c in args.checkpoints.split(",") if c)
    started = time.monotonic()

    def progress(bound: int, result: VolumeResult) -> None:
        print(
            f"  {bound:>5} calls  {time.monotonic() - started:6.1f} s  "
            f"failures {len(result.failures)}  busy retried {result.busy_total}",
            flush=True,
        )

    try:
        gateway.wait_ready(workers=args.workers)
        async with SippPhone(
            "echo", tmp, calls=args.concurrency, max_lifetime_s=args.calls * 2 + 600
        ) as phone:
            result = await run_volume(
                gateway,
                f"sipp{phone.port}",
                calls=args.calls,
                concurrency=args.concurrency,
                audio_seconds=args.seconds,
                checkpoints=checkpoints,
                slots=args.workers * 4,
                progress=progress,
            )
    finally:
        stop_gateway(gateway)

    setup = sorted(result.setup_seconds) or [0.0]
    print(
        f"sipgw volume: {result.calls} calls of {args.seconds:g} s, "
        f"{args.concurrency} at a time, {args.workers} workers"
    )
    print(f"  completed                {result.completed}/{result.calls}")
    print(f"  failures                 {len(result.failures)}")
    for line in result.failures[:10]:
        print(f"    {line}")
    print(f"  busy refusals retried    {result.busy_total} {dict(result.busy)}")
    print(f"  own tone not heard back  {len(result.wrong_tone)}")
    for line in result.wrong_tone[:5]:
        print(f"    {line}")
    print(
        f"  calls per second         {result.calls_per_second:.2f} while calling "
        f"({result.calling_seconds:.0f} s; {result.total_seconds:.0f} s with the drains)"
    )
    print(
        f"  set-up time              median {statistics.median(setup) * 1000:.0f} ms, "
        f"95th {setup[int(len(setup) * 0.95) - 1 if len(setup) > 1 else 0] * 1000:.0f} ms, "
        f"worst {setup[-1] * 1000:.0f} ms"
    )
    print("  RSS (VmRSS) by process, with no call live:")
    for line in rss_table(result):
        print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0, help="audio per call")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoints", default="100,500,1000", help="calls at which to sample")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
