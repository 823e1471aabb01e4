"""A worker killed mid-call: its phone still gets a BYE (or a CANCEL while ringing)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from peers.gateway import Gateway, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(120)


def worker_of_call(gateway, call_id: str) -> int:
    found = re.findall(rf"\({re.escape(call_id)}\) to \S+ on worker (\d+)", gateway.log.read_text())
    assert found, f"call {call_id} not in the gateway log"
    return int(found[-1])


async def kill_worker_of(gateway, call_id: str) -> None:
    index = worker_of_call(gateway, call_id)
    os.kill(gateway.pids()[index], signal.SIGKILL)


def readyz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def back_to_full_strength(gateway) -> None:
    deadline = time.monotonic() + 30
    while (await asyncio.to_thread(readyz, gateway.url))[0] != 200:
        assert time.monotonic() < deadline, gateway.health()
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of its own: the session's counts its workers' deaths."""
    gw = start_gateway(tmp_path_factory.mktemp("orphans"))
    try:
        gw.wait_ready()
        yield gw
    finally:
        stop_gateway(gw)


@pytest.mark.parametrize("kill", ["answered", "ringing"])
async def test_the_phone_of_a_killed_worker_is_hung_up(gateway, tmp_path, kill):
    mode = "answer_wait_bye" if kill == "answered" else "ring"
    call_id = f"orphan-{kill}"
    async with SippPhone(mode, tmp_path) as phone, WebClient(gateway.url) as client:
        call = await client.establish(call_id, f"sipp{phone.port}")
        await client.wait_event(call, "accepted" if kill == "answered" else "ringing")
        await asyncio.sleep(0.3)  # the dialog reaches the front right after the response
        await kill_worker_of(gateway, call_id)
        hangup = await client.wait_event(call, "hangup", timeout=5)
        assert (hangup["code"], hangup["by"]) == (500, "gateway"), hangup
        status, body = await asyncio.to_thread(readyz, gateway.url)
        assert status == 503 and body["ready"] is False, body  # until it is back
        if kill == "answered":
            report = await phone.wait_for(lambda r: r.byes == 1, timeout=10)
        else:
            report = await phone.wait_for(lambda r: r.cancels == 1, timeout=10)
        assert report.invites == 1
    await back_to_full_strength(gateway)
    method = "BYE" if kill == "answered" else "CANCEL"
    assert re.search(
        rf"orphaned call \S+: sending {method} to 127.0.0.1:{phone.port}", gateway.log.read_text()
    )
