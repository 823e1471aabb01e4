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
from collections import Counter
from pathlib import Path
from typing import Any

_PROC = Path("/proc/self")


def process_census() -> dict[str, Any]:
    """This process's pid, open fds, threads, asyncio tasks, UDP sockets and resident memory.

    ``tasks`` counts the running loop's tasks that are not done, except the one
    asking (the census itself); 0 in a process without a running loop.
    ``task_names`` counts them by coroutine, to name the one a leak check found.
    """
    inodes = _socket_inodes()
    tasks = _pending_tasks()
    return {
        "pid": os.getpid(),
        "fds": len(inodes[0]),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir(_PROC / "task")),
        "tasks": sum(tasks.values()),
        "udp_sockets": len(inodes[1] & _udp_inodes()),
        "rss_kb": _rss_kb(),
        "task_names": tasks,
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


def _pending_tasks() -> dict[str, int]:
    """The pending tasks by the name of what they run (their coroutine's qualified name)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return {}
    me = asyncio.current_task(loop)
    names = Counter(
        getattr(task.get_coro(), "__qualname__", "?")
        for task in asyncio.all_tasks(loop)
        if task is not me and not task.done()
    )
    return dict(sorted(names.items()))


def _rss_kb() -> int:
    for line in (_PROC / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
