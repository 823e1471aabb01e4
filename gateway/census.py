"""What one gateway process holds right now: the counts behind ``GET /debug/census``.

Pure standard library, imported by the front, the workers and the targets
alike (never pjsua2, aiortc or PyAV). Each process adds its own counts (calls,
peer connections, pjsua call slots) to :func:`process_census`; the tests' leak
gate compares them before and after every end-to-end test.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

_PROC = Path("/proc/self")


def process_census() -> dict[str, int]:
    """This process's pid, open fds, threads, asyncio tasks, UDP sockets and resident memory.

    ``tasks`` counts the running loop's tasks that are not done, except the one
    asking (the census itself); 0 in a process without a running loop.
    """
    inodes = _socket_inodes()
    return {
        "pid": os.getpid(),
        "fds": len(inodes[0]),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir(_PROC / "task")),
        "tasks": _pending_tasks(),
        "udp_sockets": len(inodes[1] & _udp_inodes()),
        "rss_kb": _rss_kb(),
    }


def _socket_inodes() -> tuple[list[str], set[int]]:
    """Every open fd of this process, and the inodes of those that are sockets."""
    fds, sockets = [], set()
    for fd in os.listdir(_PROC / "fd"):
        fds.append(fd)
        try:
            target = os.readlink(_PROC / "fd" / fd)
        except OSError:  # closed meanwhile (or the listing's own fd)
            continue
        if target.startswith("socket:["):
            sockets.add(int(target[8:-1]))
    return fds, sockets


def _udp_inodes() -> set[int]:
    """Inodes of the UDP sockets of this network namespace (``/proc/self/net/udp{,6}``)."""
    inodes = set()
    for table in ("udp", "udp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9:
                inodes.add(int(fields[9]))
    return inodes


def _pending_tasks() -> int:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return 0
    me = asyncio.current_task(loop)
    return sum(1 for task in asyncio.all_tasks(loop) if task is not me and not task.done())


def _rss_kb() -> int:
    for line in (_PROC / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
