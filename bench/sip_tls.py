"""Benchmark: call set-up time to a phone over UDP, over TLS, and over TLS with SRTP.

For each mode, starts a gateway with one worker (as an operator would) and a
pjsua2 phone (:mod:`peers.pjsua_phone`, listening on TLS with a certificate
from a throw-away CA for the TLS modes), then places ``--calls`` calls one after
another from an aiortc client and prints, per mode:

- the first call's set-up time (``call`` sent -> ``accepted`` received), which
  over TLS includes the TCP and TLS handshakes with the phone;
- the median and worst of the others, which reuse the worker's TLS connection.

A fourth mode is TLS to a phone that leaves TCP_NODELAY off (pjsip's default):
its 100, 180 and 200 are written back to back, and each waits for the
gateway's delayed ACK of the one before.

The browser leg (ICE, DTLS) is in every figure alike, so the differences between
the modes are what TLS and SRTP cost. Usage: python bench/sip_tls.py --calls 20
Nothing here asserts on timing; it prints figures.
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

from peers.certs import TestCa  # noqa: E402
from peers.gateway import free_port, make_config, start_gateway, stop_gateway  # noqa: E402
from peers.pjsua_phone import PhoneTls, PjsuaPhone  # noqa: E402
from peers.webclient import WebClient  # noqa: E402

#: "tls, nagle": the phone leaves TCP_NODELAY off on its TLS connections, as
#: pjsip does by default (see peers.pjsua_phone.PhoneTls).
MODES = ("udp", "tls", "tls+srtp", "tls, nagle")


async def measure(mode: str, calls: int, tmp: Path, ca: TestCa) -> list[float]:
    """Set-up times (seconds) of ``calls`` calls in a row, in ``mode``."""
    work = Path(tempfile.mkdtemp(prefix="mode-", dir=tmp))
    phone_cert = ca.issue(work, "phone", ip="127.0.0.1")
    sip: dict[str, object] = {}
    phone_options: dict[str, object] = {}
    if mode != "udp":
        sip = {"transport": "tls", "tls_ca": str(ca.cert)}
        phone_options["tls"] = PhoneTls(
            str(phone_cert.cert), str(phone_cert.key), nodelay=mode != "tls, nagle"
        )
    if mode == "tls+srtp":
        sip["srtp"] = "mandatory"
        phone_options["srtp"] = "mandatory"
    port = free_port()
    gateway = start_gateway(work, make_config(port, workers=1, settings={"sip": sip}), port)
    times: list[float] = []
    try:
        gateway.wait_ready(workers=1)
        async with PjsuaPhone(work, **phone_options) as phone, WebClient(gateway.url) as client:  # type: ignore[arg-type]
            target = f"sipp{phone.tls_port if mode != 'udp' else phone.port}"
            for i in range(calls):
                start = time.monotonic()
                call = await client.establish(f"c{i}", target)
                event = await client.wait_event(call, ("accepted", "hangup"), timeout=30)
                if event["type"] != "accepted":
                    raise RuntimeError(f"{mode}: call {i} failed: {event}")
                times.append(time.monotonic() - start)
                await client.hangup(f"c{i}")
                await phone.wait_disconnected()
    finally:
        stop_gateway(gateway)
    return times


async def run(calls: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sipgw-bench-tls-"))
    ca = TestCa.create(tmp, "bench CA")
    print(f"{calls} calls in a row per mode, browser (aiortc) -> gateway -> pjsua2 phone")
    print(f"{'mode':12} {'first (ms)':>11} {'median (ms)':>12} {'worst (ms)':>11}")
    for mode in MODES:
        times = await measure(mode, calls, tmp, ca)
        rest = times[1:] or times
        print(
            f"{mode:12} {times[0] * 1000:11.0f} {statistics.median(rest) * 1000:12.0f}"
            f" {max(rest) * 1000:11.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.calls))


if __name__ == "__main__":
    main()
