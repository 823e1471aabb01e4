"""The census counts of one process, and the leak gate's comparison of two censuses."""

from __future__ import annotations

import asyncio
import socket
import threading

from peers.census import busy, excess

from gateway.census import process_census


def test_a_udp_socket_is_one_fd_and_one_udp_socket_more() -> None:
    before = process_census()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        during = process_census()
    assert during["fds"] == before["fds"] + 1
    assert during["udp_sockets"] == before["udp_sockets"] + 1
    assert process_census()["udp_sockets"] == before["udp_sockets"]


def test_a_tcp_socket_is_no_udp_socket() -> None:
    before = process_census()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        during = process_census()
    assert during["fds"] == before["fds"] + 1
    assert during["udp_sockets"] == before["udp_sockets"]


def test_threads_count_python_and_os_threads() -> None:
    before = process_census()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        during = process_census()
    finally:
        stop.set()
        thread.join()
    assert during["threads"] == before["threads"] + 1
    assert during["os_threads"] == before["os_threads"] + 1


def test_tasks_pending_not_counting_the_one_asking() -> None:
    async def main() -> tuple[dict, dict]:
        alone = process_census()
        sleeper = asyncio.create_task(asyncio.sleep(10))
        with_one = process_census()
        sleeper.cancel()
        return alone, with_one

    alone, with_one = asyncio.run(main())
    assert (alone["tasks"], alone["task_names"]) == (0, {})
    assert (with_one["tasks"], with_one["task_names"]) == (1, {"sleep": 1})
    assert process_census()["tasks"] == 0  # no running loop


def census(worker_pid: int = 20, **worker: object) -> dict:
    counts = {"fds": 10, "threads": 6, "calls": 0, **worker}
    return {
        "front": {"pid": 1, "fds": 20, "websockets": 0},
        "workers": [{"index": 0, "pid": worker_pid, **counts}],
        "targets": [],
    }


def test_excess_names_the_process_and_the_count() -> None:
    assert excess(census(), census()) == []
    assert excess(census(), census(fds=9, threads=5)) == []  # fewer is fine
    assert excess(census(), census(fds=12, calls=1)) == [
        "worker 0 (pid 20): fds 10 -> 12 (+2)",
        "worker 0 (pid 20): calls 0 -> 1 (+1)",
    ]


def test_excess_names_the_tasks_that_are_new() -> None:
    before = census(tasks=1, task_names={"Worker.run": 1})
    after = census(tasks=3, task_names={"Worker.run": 1, "Connection.query_consent": 2})
    assert excess(before, after) == [
        "worker 0 (pid 20): tasks 1 -> 3 (+2): Connection.query_consent +2"
    ]


def test_excess_skips_a_restarted_process_but_not_a_silent_one() -> None:
    assert excess(census(), census(worker_pid=21, fds=99)) == []
    silent = census()
    silent["workers"][0] = {"index": 0, "pid": 20, "error": "no reply"}
    assert excess(census(), silent) == ["worker 0 (pid 20): no census (no reply)"]


def test_busy_lists_what_an_idle_gateway_would_not_hold() -> None:
    assert busy(census()) == []
    assert busy(census(calls=2)) == ["worker 0: calls = 2"]
