"""Calls survive a lossy, jittery SIP-side media path: 5 % loss, 30 +/- 10 ms jitter.

The impairment is on the RTP between the gateway's worker and the phone only (SIP
and the browser's WebRTC leg are untouched), so this tests the audio path, not
call set-up. The kernel has no netem qdisc, so:

- **loss**: an nftables rule, ``numgen random mod 100 < 5 drop``, on the ports the
  phones' SDP advertise, in each direction, counted;
- **jitter**: a UDP relay (``peers/jitter_relay.py``) that those ports belong to,
  delaying each datagram uniformly 20-40 ms, both ways. Delays are independent,
  so reordering is allowed (as with netem); the relay counts it.

A gateway, two sipp phones (``echo``, and ``tone`` at 800 Hz), the relays and an
aiortc browser run together in a network namespace of their own (``unshare -n``),
where the nft rules cannot touch anything else on the machine; the namespace goes
away with its processes. ``peers/impaired_call.py`` runs it all and reports JSON.

Skipped only when this machine cannot make a network namespace. A missing ``nft``
fails the test: ``tests/run`` installs it (Debian package ``nftables``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.timeout(240)

HELPER = ROOT / "tests" / "peers" / "impaired_call.py"
LOSS_PERCENT = 5
IMPAIRED_SECONDS = 10
HELPER_TIMEOUT = 180
TOLERANCE_HZ = 15
MIN_RMS = 0.02


def netns_prefix() -> list[str]:
    """The command prefix that runs a program in a new network namespace, or skip."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("network namespaces impossible here: no unshare(1) (util-linux)")
    candidates = [[unshare, "-n"]] if os.geteuid() == 0 else []
    candidates.append([unshare, "-r", "-n"])  # unprivileged: a user namespace too
    errors = []
    for prefix in candidates:
        probe = subprocess.run(
            [*prefix, "--", "true"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return prefix
        errors.append(f"{' '.join(prefix)}: {probe.stderr.strip() or probe.returncode}")
    pytest.skip(f"network namespaces impossible here: {'; '.join(errors)}")


def kill_leftovers(pidfile: Path, tmp: Path) -> None:
    """Kill what the helper started, should it have died first (only processes whose
    command line names this test's directory: never a pid reused by someone else)."""
    try:
        pids = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return
    for name, pid in pids.items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(tmp) not in cmdline:
            continue
        with contextlib.suppress(ProcessLookupError):
            if name == "gateway":  # the leader of its own session: front, workers, targets
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)


def run_helper(tmp_path: Path) -> dict:
    prefix = netns_prefix()
    out, pidfile = tmp_path / "result.json", tmp_path / "pids.json"
    cmd = [
        *prefix,
        "--",
        sys.executable,
        str(HELPER),
        "--tmp",
        str(tmp_path),
        "--seconds",
        str(IMPAIRED_SECONDS),
        "--loss",
        str(LOSS_PERCENT),
        "--out",
        str(out),
        "--pidfile",
        str(pidfile),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    helper = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "helper.stderr").open("wb"),
        start_new_session=True,
    )
    try:
        helper.wait(HELPER_TIMEOUT)
    except subprocess.TimeoutExpired:
        helper.send_signal(signal.SIGTERM)  # it stops what it started, and reports
        try:
            helper.wait(30)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait(10)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait(10)
        kill_leftovers(pidfile, tmp_path)
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        stderr = (tmp_path / "helper.stderr").read_text(errors="replace")[-3000:]
        pytest.fail(f"the impairment helper exited {helper.returncode} with no result:\n{stderr}")
    if not result.get("ok"):
        pytest.fail(
            f"impaired calls failed: {result.get('error')}\n{result.get('traceback', '')}\n"
            f"--- gateway log (tail) ---\n{result.get('gateway_log_tail', '')}"
        )
    return dict(result)


def test_calls_survive_loss_and_jitter_on_the_sip_media_path(tmp_path):
    started = time.monotonic()
    result = run_helper(tmp_path)
    tones, samples = result["tones"], result["samples"]
    print(f"impairment run: {time.monotonic() - started:.1f} s; nft {result['nft']}")
    print(f"relays {result['relays']}")
    for where in ("browser_echo", "phone_echo", "browser_tone", "phone_tone"):
        hz = [sample[where]["hz"] for sample in samples]
        rms = [sample[where]["rms"] for sample in samples]
        print(f"{where}: {min(hz)}-{max(hz)} Hz, RMS {min(rms)}-{max(rms)}")

    # ~10 s of impaired audio and nothing tore down: the only events are set-up ones,
    # and each call ended when the browser hung up.
    assert result["impaired_seconds"] >= IMPAIRED_SECONDS - 0.5, result["impaired_seconds"]
    for call, kinds in result["events"].items():
        assert "hangup" not in kinds and "error" not in kinds, (call, kinds)
        assert "accepted" in kinds, (call, kinds)
    for reply in result["hangup_replies"]:
        assert (reply["type"], reply["code"], reply["by"]) == ("hangup", 200, "local"), reply
    for phone in ("echo", "tone"):
        assert result["sipp"][phone] == {"invites": 1, "acks": 1, "byes": 1}, result["sipp"]

    # The tone, every second of the impaired period, at both ends of both calls:
    # the browser hears its own 1000 Hz back (both impaired directions) and the
    # phone's 800 Hz; the phones were sent 1000 Hz and 600 Hz.
    expected = {
        "browser_echo": tones["echo"],
        "phone_echo": tones["echo"],
        "browser_tone": tones["phone"],
        "phone_tone": tones["uplink"],
    }
    assert len(samples) >= IMPAIRED_SECONDS, samples
    for sample in samples:
        for where, hz in expected.items():
            heard = sample[where]
            assert abs(heard["hz"] - hz) <= TOLERANCE_HZ, (where, hz, sample)
            assert heard["rms"] > MIN_RMS, (where, hz, sample)

    # The loss was applied: about 5 % of the matched RTP, in each direction.
    nft = result["nft"]
    matched = nft["to_phone_matched"] + nft["to_gateway_matched"]
    dropped = nft["to_phone_dropped"] + nft["to_gateway_dropped"]
    assert matched >= 1500, nft  # 2 calls x 2 directions x 50 packets/s x 10 s, and more
    assert 0.03 <= dropped / matched <= 0.075, nft
    for direction in ("to_phone", "to_gateway"):
        share = nft[f"{direction}_dropped"] / nft[f"{direction}_matched"]
        assert 0.02 <= share <= 0.09, (direction, nft)

    # The jitter was applied: every datagram both ways went through a relay,
    # delayed 20-40 ms (30 ms on average). The tone phone's own stream reached its
    # relay (the DNAT worked), and what the relays forwarded is what nft let by.
    for name, relay in result["relays"].items():
        for direction in ("to_phone", "to_gateway"):
            stats = relay[direction]
            assert stats["forwarded"] >= 400, (name, direction, relay)
            assert 19.9 <= stats["delay_min_ms"] and stats["delay_max_ms"] <= 40.1, relay
            assert 27 <= stats["delay_mean_ms"] <= 33, relay
    relays = result["relays"]
    to_phone_received = sum(r["to_phone"]["received"] for r in relays.values())
    let_by = nft["to_phone_matched"] - nft["to_phone_dropped"]
    assert abs(to_phone_received - let_by) <= 2, (relays, nft)
