"""Run the gateway as a subprocess, exactly as an operator runs it (tests and bench)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


TEST_CONFIG = """
[http]
host = "127.0.0.1"
port = {http_port}
max_message_bytes = 65536
# The tests place calls faster than a person would, and send messages and open
# sockets faster than a browser would.
max_call_rate = 50
max_messages_per_second = 5000
max_connections_per_ip = 1000
# Every test client is 127.0.0.1 and has no token: the quotas across
# connections are tested on their own (test_quotas.py).
max_calls_per_ip = 0
calls_per_minute_per_ip = 0

[workers]
count = {workers}
calls_per_worker = 4
restart_delay = 0.5

[sip]
bind = "127.0.0.1"
invite_timeout = 3.0

[webrtc]
ice_addresses = ["127.0.0.1"]

[[dialplan.rules]]
name = "echo"
exact = "echo"
target = "sip:echo@{{embedded}}"

[[dialplan.rules]]
name = "tone"
exact = "tone"
target = "sip:tone@{{embedded}}"

[[dialplan.rules]]
name = "blocked"
regex = "blocked[0-9]+"
reject = 403
reason = "Blocked by test policy"

[[dialplan.rules]]
name = "sipp"
regex = "sipp(?P<port>[0-9]{{4,5}})"
target = "sip:phone@127.0.0.1:{{port}}"
"""


def make_config(
    http_port: int, workers: int = 2, settings: dict[str, dict[str, object]] | None = None
) -> str:
    """The test dialplan: echo/tone embedded, ``sipp<port>`` to a phone, ``blocked*`` rejected.

    ``settings`` sets keys of sections (``{"calls": {"media_timeout": 3.0}}``),
    replacing the test config's value of a key it has; a section the test config
    lacks is added.
    """
    text = TEST_CONFIG.format(http_port=http_port, workers=workers)
    for section, values in (settings or {}).items():
        header = f"[{section}]\n"
        if header not in text:
            text = header + "\n" + text
        start = text.index(header) + len(header)
        end = text.find("\n[", start)
        end = len(text) if end < 0 else end + 1
        body = text[start:end]
        for key, value in values.items():
            line = f"{key} = {json.dumps(value)}"
            body, found = re.subn(rf"^{re.escape(key)} = .*$", line, body, count=1, flags=re.M)
            if not found:
                body = line + "\n" + body
        text = text[:start] + body + text[end:]
    return text


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    """A running gateway subprocess."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    #: For a gateway serving HTTPS (``url`` then starts with ``https://``).
    ssl_context: ssl.SSLContext | None = None

    def health(self) -> dict[str, object]:
        with urllib.request.urlopen(
            f"{self.url}/healthz", timeout=2, context=self.ssl_context
        ) as response:
            return dict(json.loads(response.read()))

    def pids(self, kind: str = "worker") -> list[int | None]:
        """The pid of each ``worker`` (or ``targets``) process by index, as the gateway
        logged it at the process's last start (``/healthz`` does not show pids)."""
        text = self.log.read_text(errors="replace")
        found = {
            int(m[1]): int(m[2])
            for m in re.finditer(rf"\b{kind} (\d+) started \(pid (\d+)\)", text)
        }
        count = self.health().get("workers" if kind == "worker" else kind, 0)
        return [found.get(i) for i in range(int(count))]  # type: ignore[call-overload]

    def targets_addresses(self) -> list[str]:
        """The embedded targets' ``host:port``, as logged at start (kept across restarts)."""
        m = re.search(
            r"embedded targets echo and tone at sip:(.+)", self.log.read_text(errors="replace")
        )
        return [a.strip() for a in m[1].split(",")] if m else []

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            return str(response.read().decode())

    def wait_ready(self, timeout: float = 60.0, workers: int = 2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                if self.health().get("workers_ready") == workers:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready: {self.log.read_text()[-3000:]}")


def start_gateway(tmp: Path, config_text: str | None = None, http_port: int = 0) -> Gateway:
    http_port = http_port or free_port()
    config = tmp / "gateway.toml"
    config.write_text(config_text or make_config(http_port))
    log = tmp / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config)],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    return Gateway(f"http://127.0.0.1:{http_port}", process, log)


def stop_gateway(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.send_signal(signal.SIGINT)
        try:
            gateway.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait(5)
