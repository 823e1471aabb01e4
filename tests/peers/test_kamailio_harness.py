"""Prove the Kamailio registrar/proxy harness works with real phones (pjsua2).

Each test starts its own Kamailio (well under a second) and pjsua2 phones
(``tests/peers/pjsua_phone.py``) that register to it with digest credentials.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from peers.kamailio import Kamailio, KamLog, render_config
from peers.pjsua_phone import PjsuaPhone, SipAccount

pytestmark = pytest.mark.timeout(60)

USERS = {"1002": "pw-1002", "1003": "pw-1003", "1004": "pw-1004"}


def account(kam: Kamailio, user: str, password: str | None = None, **kw: object) -> SipAccount:
    return SipAccount(
        user,
        USERS[user] if password is None else password,
        kam.registrar,
        domain=kam.realm,
        **kw,  # type: ignore[arg-type]
    )


async def test_register_with_digest(tmp_path: Path) -> None:
    async with Kamailio(tmp_path, USERS) as kam:
        async with PjsuaPhone(tmp_path, account=account(kam, "1002")) as phone:
            reg = await phone.wait_registered()
            assert reg["expiration"] == 300  # what the phone asked for
            log = await kam.wait_log(lambda log: 200 in log.replies("REGISTER", "1002"))
            assert log.replies("REGISTER", "1002") == [401, 200], log.describe()
            assert log.auth("1002") == ["challenge", "ok"], log.describe()
            contacts = await kam.contacts("1002")
            assert len(contacts) == 1, contacts
            assert f"@127.0.0.1:{phone.port}" in contacts[0].uri
            assert 290 <= contacts[0].expires <= 300
            assert contacts[0].user_agent == "sipgw-test-pjsua-phone"
            assert await kam.contacts("1003") == []

            # unregistering (Expires: 0) removes the contact
            await phone.register(renew=False)
            await kam.wait_contacts("1002", lambda found: not found, timeout=5)


async def test_short_expires_are_refreshed(tmp_path: Path) -> None:
    """max_expires=6 shortens the phone's 300 s; it refreshes before the 6 s lapse.

    (pjsua refreshes 5 s before expiry, but never sooner than 5 s after its last
    REGISTER.)
    """
    async with Kamailio(tmp_path, USERS, max_expires=6) as kam:
        async with PjsuaPhone(tmp_path, account=account(kam, "1002")) as phone:
            reg = await phone.wait_registered()
            assert reg["expiration"] == 6  # the registrar's, from its 200
            first = (await kam.contacts("1002"))[0]
            start = time.monotonic()
            while time.monotonic() - start < 7:  # past the first registration's end
                assert await kam.contacts("1002"), kam.log().describe()
                await asyncio.sleep(0.25)
            log = kam.log()
            assert log.replies("REGISTER", "1002").count(200) >= 2, log.describe()
            (now,) = await kam.contacts("1002")
            assert now.call_id == first.call_id and now.cseq > first.cseq


@pytest.mark.parametrize("bad_auth", [401, 403])
async def test_wrong_password_never_registers(tmp_path: Path, bad_auth: int) -> None:
    """Each try gets its challenge, then 401 again (or 403); never a 200.

    pjsua gives up after a refused answer to its credentials (no retry timer for
    401/403), so the test makes it try again twice.
    """
    async with Kamailio(tmp_path, USERS, bad_auth=bad_auth) as kam:
        wrong = account(kam, "1002", "not-the-password")
        async with PjsuaPhone(tmp_path, account=wrong) as phone:
            for attempt in range(3):
                start = len(phone.events)
                if attempt:
                    await phone.register()
                refused = await phone.wait_event("reg", start=start if attempt else 0)
                assert refused["code"] == bad_auth, phone.events
            log = kam.log()
            assert log.auth("1002").count("failed:-2") == 3, log.describe()
            replies = log.replies("REGISTER", "1002")
            assert 200 not in replies, log.describe()
            assert replies.count(bad_auth) >= 3 and set(replies) <= {401, bad_auth}, replies
            assert [e["code"] for e in phone.reg_events()] == [bad_auth] * 3
            assert await kam.contacts("1002") == []


async def test_call_between_registered_phones(tmp_path: Path) -> None:
    async with Kamailio(tmp_path, USERS) as kam:
        async with (
            PjsuaPhone(tmp_path, account=account(kam, "1002"), tone_hz=700) as caller,
            PjsuaPhone(tmp_path, account=account(kam, "1003"), tone_hz=1100) as callee,
        ):
            await caller.wait_registered()
            await callee.wait_registered()
            await caller.call(f"sip:1003@{kam.realm}")  # via its outbound proxy
            await caller.wait_confirmed()
            await callee.wait_confirmed()
            heard_by_caller = await caller.wait_for_tone(1100)
            heard_by_callee = await callee.wait_for_tone(700)
            assert abs(heard_by_caller.hz - 1100) <= 10 and heard_by_caller.rms > 0.02
            assert abs(heard_by_callee.hz - 700) <= 10 and heard_by_callee.rms > 0.02

            await caller.hangup()
            await callee.wait_disconnected()
            log = await kam.wait_log(lambda log: 200 in log.replies("BYE"))
            assert log.replies("INVITE", "1002") == [407, 200], log.describe()
            assert log.auth("1002")[-1] == "ok"
            invites = log.forwarded("INVITE", "1003")
            assert len(invites) == 1, log.describe()
            assert f"@127.0.0.1:{callee.port}" in invites[0].ruri
            assert invites[0].dst == f"127.0.0.1:{callee.port}"
            # the ACK and the BYE followed the Record-Route through Kamailio
            assert log.forwarded("ACK", "1003") and log.forwarded("BYE", "1003"), log.describe()


async def test_cancel_while_ringing(tmp_path: Path) -> None:
    async with Kamailio(tmp_path, USERS) as kam:
        async with (
            PjsuaPhone(tmp_path, account=account(kam, "1002")) as caller,
            PjsuaPhone(tmp_path, account=account(kam, "1003"), answer_delay_ms=30000) as callee,
        ):
            await caller.wait_registered()
            await callee.wait_registered()
            await caller.call(f"sip:1003@{kam.realm}")
            await caller.wait_event(lambda e: e.get("event") == "state" and e["state"] == "EARLY")
            await caller.hangup()  # CANCEL
            assert (await caller.wait_disconnected())["code"] == 487
            assert (await callee.wait_disconnected())["code"] == 487
            log = await kam.wait_log(lambda log: 487 in log.replies("INVITE", "1002"))
            assert log.forwarded("CANCEL", "1003"), log.describe()
            assert log.replies("CANCEL", "1002") == [200], log.describe()


async def test_unknown_and_unregistered_users(tmp_path: Path) -> None:
    async with Kamailio(tmp_path, USERS) as kam:
        async with PjsuaPhone(tmp_path, account=account(kam, "1002")) as phone:
            await phone.wait_registered()
            for target, code in (("9999", 404), ("1004", 480)):
                start = len(phone.events)
                await phone.call(f"sip:{target}@{kam.realm}")
                ended = await phone.wait_event("disconnected", start=start)
                assert ended["code"] == code, kam.log().describe()
            log = kam.log()
            assert log.decided("lookup") == ["unknown", "not-registered"]
            assert not log.forwarded("INVITE"), log.describe()


async def test_trusted_source_calls_without_auth(tmp_path: Path) -> None:
    """A trusted socket (the gateway's) calls without credentials; others get 407.

    The phones have no account: no credentials, no outbound proxy; they call
    ``kam.uri(...)`` as the gateway will. One is trusted from the start, the
    other after a 407, at run time.
    """
    async with PjsuaPhone(tmp_path) as gateway, PjsuaPhone(tmp_path) as other:
        trusted = [f"127.0.0.1:{gateway.port}"]
        async with (
            Kamailio(tmp_path, USERS, trusted=trusted) as kam,
            PjsuaPhone(tmp_path, account=account(kam, "1003"), tone_hz=1100) as callee,
        ):
            await callee.wait_registered()
            await gateway.call(kam.uri("1003"))
            await gateway.wait_confirmed()
            heard = await gateway.wait_for_tone(1100)
            assert abs(heard.hz - 1100) <= 10 and heard.rms > 0.02
            await gateway.hangup()
            await callee.wait_disconnected()

            await other.call(kam.uri("1003"))
            refused = await other.wait_disconnected()
            assert refused["code"] == 407

            await kam.trust(f"127.0.0.1:{other.port}")
            start = len(other.events)
            await other.call(kam.uri("1003"))
            await other.wait_event("confirmed", start=start)

            log = kam.log()
            assert log.auth("phone") == ["trusted", "challenge", "trusted"], log.describe()
            assert len(log.forwarded("INVITE", "1003")) == 2, log.describe()
            assert log.replies("INVITE", "phone") == [200, 407, 200], log.describe()


_ORPHAN = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from peers.kamailio import Kamailio

async def main():
    kam = Kamailio(Path({tmp!r}), {{"1002": "pw"}})
    await kam.start()
    print(kam.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


async def test_kamailio_dies_with_the_test_process(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ORPHAN.format(tests=tests, tmp=str(tmp_path)),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        pgid = int(line)
        assert len(_live_members(pgid)) >= 3  # main process and its children
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        deadline = time.monotonic() + 5
        while _live_members(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert _live_members(pgid) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _wire(tag: str, src: str, dst: str, message: str) -> str:
    data = message.encode()
    b64 = base64.b64encode(data).decode()
    return f" 1(4189) NOTICE: <script>: KAMWIRE\t{tag}\t{src}\t{dst}\tudp\t{len(data)}\t{b64}"


def test_log_parser() -> None:
    invite = (
        "INVITE sip:1003@127.0.0.1:4000;ob SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKabc\r\n"
        "f: <sip:1002@sipgw.test>;tag=x\r\nTo: <sip:1003@sipgw.test>\r\n"
        "Call-ID: abc\r\nCSeq: 2 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    reply = (
        "SIP/2.0 407 Proxy Authentication Required\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:3000;branch=z9hG4bKdef\r\n"
        "From: <sip:1002@sipgw.test>;tag=x\r\nTo: <sip:1003@sipgw.test>;tag=y\r\n"
        "Call-ID: abc\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    decision = (
        " 2(4190) NOTICE: <script>: KAMLOG\tauth\tINVITE\t1002\t1003\tabc\t1\t"
        "127.0.0.1:3000\tchallenge"
    )
    out_reply = _wire("snd", "127.0.0.1:5060", "127.0.0.1:3000", reply)
    lines = [
        "noise",
        decision,
        out_reply,
        out_reply,  # a retransmission
        _wire("snd", "127.0.0.1:5060", "127.0.0.1:4000", invite),
        out_reply[:-8],  # cut short: dropped
    ]
    log = KamLog.parse("\n".join(lines))
    assert len(log.all_messages) == 3 and len(log.messages) == 2
    assert log.auth("1002") == ["challenge"]
    assert log.replies("INVITE", "1002") == [407]
    (out,) = log.forwarded("INVITE", "1003")
    assert out.ruri == "sip:1003@127.0.0.1:4000;ob" and out.status is None
    assert (out.from_user, out.call_id, out.cseq, out.branch) == ("1002", "abc", 2, "z9hG4bKabc")
    assert out.dst == "127.0.0.1:4000"
    assert len(log.describe().splitlines()) == 3


def test_config_is_valid(tmp_path: Path) -> None:
    """``kamailio -c`` accepts the script with every option in use."""
    import shutil
    import subprocess

    binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
    text = render_config(
        port=5999, realm="sipgw.test", users=USERS, trusted=("127.0.0.1:5080", "127.0.0.2"),
        rpc_socket=str(tmp_path / "rpc.sock"), min_expires=5, max_expires=10,
        default_expires=10, bad_auth=403, ring_timeout=30, children=1, debug=1,
    )  # fmt: skip
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(text)
    out = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr[-3000:]
