"""Two calls through a gateway whose SIP-side RTP loses packets and jitters.

Run inside a fresh network namespace (``unshare -n``) by
``tests/e2e/test_impairment.py``; it prints one JSON object on stdout (and writes
it to ``--out``). In the namespace it:

1. brings ``lo`` up;
2. starts two jitter relays (``peers/jitter_relay.py``: each datagram delayed
   uniformly 20-40 ms, both directions) and two sipp phones whose SDP advertises
   the relay's port: one in ``echo`` mode, one in ``tone`` mode (an 800 Hz tone);
3. installs nftables rules: ``numgen random mod 100 < LOSS`` drops on the relays'
   public ports only (the gateway <-> relay leg, each direction counted apart), and
   a DNAT that turns the tone phone's own stream (sent straight to the gateway's
   RTP address from its SDP) into the tone relay, so it is delayed too. SIP and
   the browser's WebRTC leg are not touched;
4. starts the gateway (``peers/gateway.py``) and places both calls from an aiortc
   client (``peers/webclient.py``): the echo call sends 1000 Hz and should hear
   it back through both impaired directions, the tone call sends 600 Hz and
   should hear the phone's 800 Hz;
5. holds the calls for ``--seconds`` of impaired audio, measuring every second
   what the browser hears and what each phone was sent (decoded from the RTP the
   relay forwards), and watching for any ``hangup``;
6. hangs up, reads the nft counters and prints everything.

Everything binds to 127.0.0.1. Every process it starts is stopped on the way out,
on an error or SIGTERM too; the pids go to ``--pidfile`` as they start so the
caller can kill them should this process itself be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from peers.gateway import start_gateway, stop_gateway  # noqa: E402
from peers.jitter_relay import JitterRelay  # noqa: E402
from peers.sipp import SippPhone  # noqa: E402
from peers.webclient import RATE, WebClient, dominant_frequency  # noqa: E402

TABLE = "sipgw_impair"
NAT_TABLE = "sipgw_impair_nat"
ECHO_HZ = 1000.0  # the browser's tone on the echo call, heard back
UPLINK_HZ = 600.0  # the browser's tone on the tone call, heard by that phone
PHONE_HZ = 800.0  # the tone phone's tone, heard by the browser


class RelayedPhone(SippPhone):
    """A sipp phone whose SDP advertises a relay's port instead of its own media port."""

    def __init__(self, mode: str, tmp_path: Path, relay_port: int, **kwargs: Any) -> None:
        self.relay_port = relay_port
        super().__init__(mode, tmp_path, **kwargs)

    def _render_scenario(self) -> None:
        super()._render_scenario()
        text = self.scenario_path.read_text()
        text = text.replace("m=audio [media_port]", f"m=audio {self.relay_port}")
        # sipp binds its rtp_stream socket (on its media port) when it expands
        # [rtpstream_audio_port]: keep the keyword, in an attribute nobody reads.
        text = text.replace(
            "m=audio [rtpstream_audio_port] RTP/AVP 0",
            f"m=audio {self.relay_port} RTP/AVP 0\n      a=x-sipp-stream:[rtpstream_audio_port]",
        )
        self.scenario_path.write_text(text)


def tool(name: str) -> str:
    """Path of a system tool, looked up in /usr/sbin and /sbin too (not on every PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        package = {"nft": "nftables", "ip": "iproute2"}.get(name, name)
        raise RuntimeError(
            f"{name} is not installed (Debian package {package}; tests/run installs it)"
        )
    return found


def run(cmd: list[str], stdin: str | None = None) -> str:
    cmd = [tool(cmd[0]), *cmd[1:]]
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def install_nft(loss: int, relay_ports: list[int], tone_media_port: int, intercept: int) -> None:
    ports = ", ".join(str(p) for p in relay_ports)
    ruleset = f"""
table inet {TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {{ {ports} }} counter comment "to_phone_matched"
        udp dport {{ {ports} }} numgen random mod 100 < {loss} counter drop comment "to_phone_dropped"
        udp sport {{ {ports} }} counter comment "to_gateway_matched"
        udp sport {{ {ports} }} numgen random mod 100 < {loss} counter drop comment "to_gateway_dropped"
    }}
}}
table ip {NAT_TABLE} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.1 udp sport {tone_media_port} udp dport != {intercept} dnat to 127.0.0.1:{intercept}
    }}
}}
"""  # noqa: E501
    run(["nft", "-f", "-"], stdin=ruleset)


def nft_counters() -> dict[str, int]:
    """Packets counted by each rule of the loss table, by the rule's comment."""
    counters: dict[str, int] = {}
    listing = json.loads(run(["nft", "-j", "list", "table", "inet", TABLE]))
    for item in listing["nftables"]:
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule["expr"]:
            if "counter" in expr:
                counters[rule["comment"]] = int(expr["counter"]["packets"])
    return counters


def remove_nft() -> None:
    for family, table in (("inet", TABLE), ("ip", NAT_TABLE)):
        with contextlib.suppress(Exception):
            run(["nft", "delete", "table", family, table])


def measure(pcm: Any, rate: int) -> dict[str, float]:
    tone = dominant_frequency(pcm, rate)
    return {"hz": round(tone.hz, 1), "rms": round(tone.rms, 4)}


class Pids:
    """Pids of the processes started here, written to a file as they start."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pids: dict[str, int] = {}

    def add(self, name: str, pid: int | None) -> None:
        if pid is None:
            return
        self.pids[name] = pid
        if self.path is not None:
            self.path.write_text(json.dumps(self.pids))


async def scenario(args: argparse.Namespace, pids: Pids, result: dict[str, Any]) -> None:
    tmp = Path(args.tmp)
    tool("nft")  # fail early, and with the package to install, if it is missing
    run(["ip", "link", "set", "lo", "up"])

    echo_relay = await JitterRelay(seed=1).start()
    tone_relay = await JitterRelay(seed=2).start()
    gateway = None
    try:
        async with (
            RelayedPhone("echo", tmp, echo_relay.port, max_lifetime_s=args.seconds + 120) as echo,
            RelayedPhone(
                "tone",
                tmp,
                tone_relay.port,
                tone_hz=PHONE_HZ,
                max_lifetime_s=args.seconds + 120,
            ) as tone,
        ):
            pids.add("sipp_echo", echo.pid)
            pids.add("sipp_tone", tone.pid)
            echo_relay.connect(echo.media_port)
            tone_relay.connect(tone.media_port)
            install_nft(
                args.loss,
                [echo_relay.port, tone_relay.port],
                tone.media_port,
                tone_relay.intercept_port,
            )
            result["ports"] = {
                "echo_relay": echo_relay.port,
                "tone_relay": tone_relay.port,
                "echo_sipp": [echo.port, echo.media_port],
                "tone_sipp": [tone.port, tone.media_port],
            }

            gateway = start_gateway(tmp)
            pids.add("gateway", gateway.process.pid)
            gateway.wait_ready(timeout=90)
            await impaired_calls(args, gateway, echo, tone, echo_relay, tone_relay, result)
            result["sipp"] = {
                "echo": _sipp_summary(await echo.report()),
                "tone": _sipp_summary(await tone.report()),
            }
    finally:
        result["relays"] = {"echo": echo_relay.stats(), "tone": tone_relay.stats()}
        with contextlib.suppress(Exception):
            result["nft"] = nft_counters()
        echo_relay.close()
        tone_relay.close()
        if gateway is not None:
            stop_gateway(gateway)
            result["gateway_log_tail"] = gateway.log.read_text(errors="replace")[-3000:]
        remove_nft()


def _sipp_summary(report: Any) -> dict[str, int]:
    return {"invites": report.invites, "acks": report.acks, "byes": report.byes}


async def impaired_calls(
    args: argparse.Namespace,
    gateway: Any,
    echo: SippPhone,
    tone: SippPhone,
    echo_relay: JitterRelay,
    tone_relay: JitterRelay,
    result: dict[str, Any],
) -> None:
    async with WebClient(gateway.url) as client:
        echo_call = await client.establish("echo", f"sipp{echo.port}", ECHO_HZ, timeout=30)
        tone_call = await client.establish("tone", f"sipp{tone.port}", UPLINK_HZ, timeout=30)
        for call in (echo_call, tone_call):
            event = await client.wait_event(call, ("accepted", "hangup"), timeout=30)
            if event["type"] != "accepted":
                raise RuntimeError(f"call {call.call_id} not accepted: {event}")
        # Media settles (jitter buffers fill) before the measured period starts.
        await echo_call.wait_for_tone(ECHO_HZ, timeout=10, tolerance=15)
        await tone_call.wait_for_tone(PHONE_HZ, timeout=10, tolerance=15)

        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        for second in range(1, int(args.seconds) + 1):
            await asyncio.sleep(started + second - time.monotonic())
            samples.append(
                {
                    "t": round(time.monotonic() - started, 2),
                    "browser_echo": measure(echo_call.audio(1.0), RATE),
                    "browser_tone": measure(tone_call.audio(1.0), RATE),
                    "phone_echo": measure(echo_relay.phone_heard(1.0), 8000),
                    "phone_tone": measure(tone_relay.phone_heard(1.0), 8000),
                }
            )
        impaired_for = time.monotonic() - started
        events_during = {
            call.call_id: [e["type"] for e in call.events] for call in (echo_call, tone_call)
        }
        replies = [await client.hangup(call.call_id) for call in (echo_call, tone_call)]
        await echo.wait_for(lambda r: r.byes >= 1, timeout=10)
        await tone.wait_for(lambda r: r.byes >= 1, timeout=10)
        result.update(
            {
                "impaired_seconds": round(impaired_for, 2),
                "samples": samples,
                "events": events_during,
                "hangup_replies": replies,
                "frames_received": {c.call_id: c.frames_received for c in (echo_call, tone_call)},
                "tones": {
                    "echo": ECHO_HZ,
                    "uplink": UPLINK_HZ,
                    "phone": PHONE_HZ,
                },
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tmp", required=True, help="work directory (logs, configs)")
    parser.add_argument("--seconds", type=float, default=10.0, help="impaired audio to hold")
    parser.add_argument("--loss", type=int, default=5, help="percent of RTP datagrams dropped")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--pidfile", help="write the pids of started processes here")
    args = parser.parse_args()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    result: dict[str, Any] = {"ok": False}
    pids = Pids(Path(args.pidfile) if args.pidfile else None)
    try:
        asyncio.run(scenario(args, pids, result))
        result["ok"] = True
    except BaseException as exc:  # report it, whatever it is
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
