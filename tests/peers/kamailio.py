"""Run ``kamailio`` as a registrar and proxy that phones and the gateway register to.

Usage::

    async with Kamailio(tmp_path, {"1002": "secret2", "1003": "secret3"}) as kam:
        kam.port                     # its SIP/UDP port on 127.0.0.1
        kam.registrar                # "sip:127.0.0.1:<port>" (also the outbound proxy)
        kam.realm                    # "sipgw.test": digest realm and AoR domain
        kam.uri("1003")              # "sip:1003@127.0.0.1:<port>": routable without DNS
        ...                          # phones register as 1002/1003 and call each other
        contacts = await kam.contacts("1002")          # from usrloc, over JSON-RPC
        log = await kam.wait_log(lambda log: 200 in log.replies("REGISTER", "1002"))
        assert log.replies("REGISTER", "1002") == [401, 200]
        assert log.auth("1002") == ["challenge", "ok"]
        assert log.forwarded("INVITE", "1003")         # INVITEs it sent on to 1003

What the script (``kamailio.cfg``, written into the work directory) does:

* **REGISTER**: digest authentication (qop=auth) against the users given to the
  driver (an in-memory ``htable``, no database) in ``realm``; 401 without valid
  credentials, then ``save("location")`` into ``usrloc`` (memory only). The digest
  user must be the AoR's user (else 403). Expires are bounded by ``min_expires``
  (shorter asks are raised to it), ``max_expires`` (longer ones are lowered: a test
  forces quick refreshes with ``max_expires=10``) and ``default_expires`` (for a
  REGISTER that states none).
* **Other initial requests** (INVITE, MESSAGE, OPTIONS to a user...): 407 unless the
  request carries valid proxy credentials of its From user, or comes from a trusted
  source (``trusted``: ``"ip"`` or ``"ip:port"``, e.g. the gateway's SIP socket)
  which needs none. Then, for a request to this proxy: 404 if the R-URI user is not
  a known user, 480 if known but not registered, else it goes to the registered
  contact(s) (``lookup("location")``), record-routed. A request for another host is
  relayed as addressed.
* **In-dialog requests** follow their Route set (``loose_route``); CANCEL and ACK
  go with their transaction. OPTIONS to the proxy itself (no user) gets 200.
* A wrong password (or an unknown user) gets another challenge, like a stock
  Kamailio (``bad_auth=401``), or 403 (``bad_auth=403``).

The log (``kamailio.log`` in the work directory, Kamailio's stderr) has an ``xlog``
line for every SIP message Kamailio receives or sends, whole (the ``sipdump``
module's event route, base64), and one for each decision of the script (auth,
location lookup, save). :meth:`Kamailio.log` parses them into a :class:`KamLog`.

Kamailio runs in the foreground (``-DD -E``) in a session of its own, with its pid
file, runtime directory, JSON-RPC socket and config in its work directory (or a
private directory in /tmp if that path is too long for a socket); nothing else is
written. Leaving the context stops it; if the test process dies, the kernel sends
its main process SIGTERM (``PR_SET_PDEATHSIG``), which ends its children, and an
``atexit`` hook SIGKILLs the process group. UDP on 127.0.0.1, and TLS there too
when given a certificate (``tls=``; Debian's ``kamailio-tls-modules``).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from peers.certs import Issued
from peers.sipp import free_udp_port

HOST = "127.0.0.1"
DEFAULT_REALM = "sipgw.test"
MODULES_DIR = "/usr/lib/x86_64-linux-gnu/kamailio/modules"

_START_TIMEOUT_S = 10.0
_TERM_GRACE_S = 3.0
_RPC_TIMEOUT_S = 3.0
#: markers of the log lines: a decision, a SIP message (tab-separated fields follow)
_MARK = "KAMLOG"
_WIRE_MARK = "KAMWIRE"
_NAME_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
_PASSWORD_RE = re.compile(r'^[^"\\$\s]{1,128}$')
_TRUSTED_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}(:\d{1,5})?$")
#: Contact.expires of a contact that never expires
_PERMANENT = 10**9


class KamailioNotFoundError(RuntimeError):
    """The ``kamailio`` binary is not installed."""


class KamailioError(RuntimeError):
    """Kamailio did not start, exited, or refused an RPC."""


# ==========================================================================
# the message log
# ==========================================================================

_COMPACT = {
    "i": "call-id",
    "v": "via",
    "t": "to",
    "f": "from",
    "l": "content-length",
    "m": "contact",
    "c": "content-type",
    "k": "supported",
}
_USER_RE = re.compile(r"sips?:([^@;>\s]+)@", re.IGNORECASE)


def _param(value: str, name: str) -> str:
    m = re.search(rf";\s*{name}=([^;,\s>]+)", value, re.IGNORECASE)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class SipMessage:
    """One SIP message Kamailio received (``direction`` ``in``) or sent (``out``).

    Taken off the wire by Kamailio's ``sipdump`` module: retransmissions, the
    CANCELs and ACKs its transaction layer makes, its own replies and the ones it
    relays are all here.
    """

    direction: str
    src: str  # "ip:port"
    dst: str
    method: str | None  # a request's method; None for a reply
    status: int | None  # a reply's status; None for a request
    reason: str
    ruri: str
    #: (lower-case name, value) in order; compact names expanded
    headers: tuple[tuple[str, str], ...]
    body: str
    text: str = dataclasses.field(repr=False)
    #: the transport it came or went on: "udp", "tls" ("" when not known)
    proto: str = ""

    def header(self, name: str) -> str:
        """The first value of header ``name`` ("" if absent)."""
        values = self.header_all(name)
        return values[0] if values else ""

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    @property
    def is_request(self) -> bool:
        return self.method is not None

    @property
    def call_id(self) -> str:
        return self.header("call-id")

    @property
    def cseq(self) -> int:
        head = self.header("cseq").split()[:1]
        return int(head[0]) if head and head[0].isdigit() else -1

    @property
    def cseq_method(self) -> str:
        parts = self.header("cseq").split()
        return parts[1].upper() if len(parts) > 1 else ""

    @property
    def from_user(self) -> str:
        m = _USER_RE.search(self.header("from"))
        return m.group(1) if m else ""

    @property
    def to_user(self) -> str:
        m = _USER_RE.search(self.header("to"))
        return m.group(1) if m else ""

    @property
    def to_tag(self) -> str:
        return _param(self.header("to"), "tag")

    @property
    def branch(self) -> str:
        return _param(self.header("via"), "branch")

    @property
    def summary(self) -> str:
        """``"INVITE"`` for a request, ``"407 INVITE"`` for a reply."""
        if self.method is not None:
            return self.method
        return f"{self.status} {self.cseq_method}"

    def key(self) -> tuple[object, ...]:
        """Identity used to collapse retransmissions."""
        return (self.direction, self.summary, self.call_id, self.cseq, self.branch, self.dst)


def parse_sip(
    text: str, direction: str = "in", src: str = "", dst: str = "", proto: str = ""
) -> SipMessage | None:
    """One SIP message from its text (None if the start line is not SIP)."""
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    parts = lines[0].split(" ", 2)
    method: str | None = None
    status: int | None = None
    reason = ruri = ""
    if parts[0].upper().startswith("SIP/") and len(parts) >= 2 and parts[1].isdigit():
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
    elif len(parts) == 3 and parts[2].upper().startswith("SIP/"):
        method, ruri = parts[0].upper(), parts[1]
    else:
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded onto the previous line
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            headers.append((_COMPACT.get(key, key), value.strip()))
    return SipMessage(
        direction, src, dst, method, status, reason, ruri, tuple(headers), body, text, proto
    )


@dataclass(frozen=True)
class Decision:
    """What the script decided about a request (its ``xlog`` line).

    ``kind`` / ``detail``:

    ``auth``    ``ok``, ``trusted`` (no auth asked), ``challenge`` (no credentials:
                401/407), ``challenge:<rc>`` (stale nonce...), ``failed:-2`` (wrong
                password), ``failed:unknown-user``, ``failed:mismatch`` (digest user
                is not the From/To user: 403)
    ``lookup``  ``found`` (sent to the contacts), ``unknown`` (404),
                ``not-registered`` (480)
    ``save``    the return code of ``save("location")`` for a REGISTER
    """

    kind: str
    detail: str
    method: str
    from_user: str
    to_user: str
    call_id: str
    cseq: int
    src: str


class KamLog:
    """Kamailio's log: every SIP message in and out, and the script's decisions.

    ``messages`` has retransmissions collapsed; ``all_messages`` keeps them.
    ``entries`` interleaves messages (collapsed) and decisions in log order.
    """

    def __init__(self, entries: Iterable[SipMessage | Decision], text: str = "") -> None:
        self.all_messages: list[SipMessage] = []
        self.messages: list[SipMessage] = []
        self.decisions: list[Decision] = []
        self.entries: list[SipMessage | Decision] = []
        seen: set[tuple[object, ...]] = set()
        for entry in entries:
            if isinstance(entry, Decision):
                self.decisions.append(entry)
                self.entries.append(entry)
                continue
            self.all_messages.append(entry)
            k = entry.key()
            if k not in seen:
                seen.add(k)
                self.messages.append(entry)
                self.entries.append(entry)
        self.text = text

    @classmethod
    def parse(cls, text: str) -> KamLog:
        entries: list[SipMessage | Decision] = []
        for line in text.splitlines():
            entry = _parse_line(line)
            if entry is not None:
                entries.append(entry)
        return cls(entries, text)

    def of(
        self, direction: str, method: str | None = None, user: str | None = None
    ) -> list[SipMessage]:
        """Messages ``in`` or ``out``; ``method``: requests of it and replies to it;
        ``user``: the From or the To user."""
        return [
            m
            for m in self.messages
            if m.direction == direction
            and (method is None or (m.method or m.cseq_method) == method)
            and (user is None or user in (m.from_user, m.to_user))
        ]

    def replies(self, method: str, user: str | None = None, *, final: bool = True) -> list[int]:
        """Status codes Kamailio sent for ``method`` requests (From or To ``user``).

        Its own replies and relayed ones, in order; 1xx left out unless
        ``final=False``. E.g. ``log.replies("REGISTER", "1002") == [401, 200]``.
        """
        return [
            m.status
            for m in self.of("out", method, user)
            if m.status is not None and (m.status >= 200 or not final)
        ]

    def received(self, method: str, user: str | None = None) -> list[SipMessage]:
        """Requests of ``method`` Kamailio received."""
        return [m for m in self.of("in", method, user) if m.is_request]

    def forwarded(self, method: str, to_user: str | None = None) -> list[SipMessage]:
        """Requests of ``method`` Kamailio sent, whose To user is ``to_user``."""
        return [
            m
            for m in self.of("out", method)
            if m.is_request and (to_user is None or m.to_user == to_user)
        ]

    def decided(self, kind: str, user: str | None = None) -> list[str]:
        """The details of the ``kind`` decisions (for From or To ``user``), in order."""
        return [
            d.detail
            for d in self.decisions
            if d.kind == kind and (user is None or user in (d.from_user, d.to_user))
        ]

    def auth(self, user: str | None = None) -> list[str]:
        """The auth decisions: ``["challenge", "ok"]`` for a good REGISTER."""
        return self.decided("auth", user)

    def summary(self) -> list[str]:
        """One short line per entry, for assertion messages."""
        out = []
        for e in self.entries:
            if isinstance(e, Decision):
                out.append(f"  [{e.kind} {e.method} {e.from_user}->{e.to_user}: {e.detail}]")
            else:
                arrow = "<-" if e.direction == "in" else "->"
                peer = e.src if e.direction == "in" else e.dst
                what = f"{e.method} {e.ruri}" if e.method else f"{e.status} {e.cseq_method}"
                out.append(f"{arrow} {peer:<21} {what}  ({e.from_user}->{e.to_user})")
        return out

    def describe(self) -> str:
        return "\n".join(self.summary())


def _parse_line(line: str) -> SipMessage | Decision | None:
    at = line.find(_WIRE_MARK + "\t")
    if at >= 0:
        parts = line[at:].rstrip("\r\n").split("\t")
        if len(parts) != 7:
            return None
        _, tag, src, dst, proto, length, data = parts
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            return None
        if length.isdigit() and len(raw) != int(length):
            return None  # cut short (a line longer than the log could write whole)
        direction = "in" if tag == "rcv" else "out"
        return parse_sip(raw.decode("utf-8", "replace"), direction, src, dst, proto.lower())
    at = line.find(_MARK + "\t")
    if at >= 0:
        parts = line[at:].rstrip("\r\n").split("\t")
        if len(parts) != 9:
            return None
        _, kind, method, from_user, to_user, call_id, cseq, src, detail = (
            "" if p == "<null>" else p for p in parts
        )
        return Decision(
            kind, detail, method, from_user, to_user, call_id,
            int(cseq) if cseq.isdigit() else -1, src,
        )  # fmt: skip
    return None


@dataclass(frozen=True)
class Contact:
    """One registered contact, from ``ul.lookup``."""

    uri: str
    #: seconds left until it expires (as of the query); 10**9 if it never does
    expires: int
    call_id: str
    cseq: int
    user_agent: str
    received: str
    raw: dict[str, Any]


# ==========================================================================
# the config
# ==========================================================================

#: The script. ``@NAME@`` are filled in by render_config(); a line
#: ``decide(kind, detail);`` becomes the xlog of a Decision.
_CONFIG = r"""#!KAMAILIO
# Written by tests/peers/kamailio.py for one test: a registrar and proxy on
# 127.0.0.1:@PORT@ with its users in memory. Nothing here touches the system.

debug=@DEBUG@
log_stderror=yes
fork=yes
children=@CHILDREN@
@TCP@
disable_sctp=yes
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=off
dns_try_ipv6=no
listen=udp:127.0.0.1:@PORT@
@TLS_LISTEN@alias="@REALM@"
alias="127.0.0.1:@PORT@"
server_header="Server: sipgw-test-kamailio"
user_agent_header="User-Agent: sipgw-test-kamailio"

mpath="@MODULES@"
loadmodule "jsonrpcs.so"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "auth.so"
loadmodule "htable.so"
loadmodule "sipdump.so"
@TLS_MODULE@
modparam("jsonrpcs", "transport", 4)
modparam("jsonrpcs", "dgram_socket", "@RPC_SOCKET@")
modparam("xlog", "buf_size", 65536)
modparam("sipdump", "enable", 1)
modparam("sipdump", "mode", 2)
modparam("tm", "fr_inv_timer", @FR_INV_TIMER@)
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "timer_interval", 5)
modparam("registrar", "min_expires", @MIN_EXPIRES@)
modparam("registrar", "max_expires", @MAX_EXPIRES@)
modparam("registrar", "default_expires", @DEFAULT_EXPIRES@)
modparam("auth", "nonce_expire", 300)
modparam("htable", "htable", "users=>size=6;")
modparam("htable", "htable", "trusted=>size=4;")

event_route[htable:mod-init] {
@INIT@
}

# Every SIP message in and out, whole (base64), from the network layer.
event_route[sipdump:msg] {
    xlog("L_NOTICE", "@WIRE@");
}

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (has_totag()) {
        route(WITHINDLG);
        exit;
    }
    if (is_method("CANCEL")) {
        if (t_check_trans()) {
            route(RELAY);
        }
        exit;
    }
    if (is_method("ACK")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    # a retransmission of a request under way ends here
    t_check_trans();
    # initial requests: drop preloaded routes (a phone's outbound proxy: this one)
    remove_hf("Route");
    if (is_method("REGISTER")) {
        route(AUTH);
        $var(saved) = save("location");
        decide(save, $var(saved));
        if ($var(saved) < 0) {
            sl_reply_error();
        }
        exit;
    }
    if (is_method("OPTIONS") && uri == myself && $rU == $null) {
        sl_send_reply("200", "OK");
        exit;
    }
    route(AUTH);
    if (is_method("INVITE|SUBSCRIBE|REFER")) {
        record_route();
    }
    if (!(uri == myself)) {
        route(RELAY);
        exit;
    }
    route(LOCATION);
}

# Returns when the request may go on; else replies and exits.
route[AUTH] {
    $var(src) = $si + ":" + $sp;
    if (!is_method("REGISTER")
            && ($sht(trusted=>$var(src)) != $null || $sht(trusted=>$si) != $null)) {
        decide(auth, trusted);
        return;
    }
    if (!(is_present_hf("Authorization") || is_present_hf("Proxy-Authorization"))) {
        decide(auth, challenge);
        auth_challenge("@REALM@", "1");
        exit;
    }
    if ($au == $null || $sht(users=>$au) == $null) {
        decide(auth, failed:unknown-user);
        @ON_BAD@
        exit;
    }
    $var(password) = $sht(users=>$au);
    $var(rc) = pv_auth_check("@REALM@", "$var(password)", "0", "1");
    if ($var(rc) == -8) {
        decide(auth, failed:mismatch);
        send_reply("403", "Forbidden");
        exit;
    }
    if ($var(rc) == -2) {
        decide(auth, failed:-2);
        @ON_BAD@
        exit;
    }
    if ($var(rc) < 0) {
        # no credentials for this realm, a stale or reused nonce: a new challenge
        decide(auth, challenge:$var(rc));
        auth_challenge("@REALM@", "1");
        exit;
    }
    decide(auth, ok);
    consume_credentials();
}

route[LOCATION] {
    if ($rU == $null || $sht(users=>$rU) == $null) {
        decide(lookup, unknown);
        send_reply("404", "Not Found");
        exit;
    }
    $var(found) = lookup("location");
    if ($var(found) < 0) {
        decide(lookup, not-registered);
        send_reply("480", "Temporarily Unavailable");
        exit;
    }
    decide(lookup, found);
    route(RELAY);
}

route[WITHINDLG] {
    if (loose_route()) {
        route(RELAY);
        exit;
    }
    if (is_method("ACK")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    sl_send_reply("404", "Not Here");
    exit;
}

route[RELAY] {
    if (!t_relay()) {
        sl_reply_error();
    }
    exit;
}
"""

#: With ``tls``: TCP on (TLS runs over it) but only the TLS socket listens; TLS 1.2
#: (the pjsua2 wheel's OpenSSL 1.0.2k has no 1.3), no client certificates asked
#: for, and none checked when Kamailio connects to a registered contact.
_TLS_CORE = """disable_tcp=no
enable_tls=yes
tcp_children=2"""
_TLS_MODULE = """loadmodule "tls.so"
modparam("tls", "certificate", "%s")
modparam("tls", "private_key", "%s")
modparam("tls", "tls_method", "TLSv1.2+")
modparam("tls", "verify_certificate", 0)
modparam("tls", "require_certificate", 0)
"""

_DECIDE_RE = re.compile(r"^(\s*)decide\((\w+), (.*)\);$", re.MULTILINE)


def render_config(
    *,
    port: int,
    realm: str,
    users: Mapping[str, str],
    trusted: Iterable[str],
    rpc_socket: str,
    min_expires: int,
    max_expires: int,
    default_expires: int,
    bad_auth: int,
    ring_timeout: float,
    children: int,
    debug: int,
    tls_port: int = 0,
    tls: Issued | None = None,
) -> str:
    """The kamailio.cfg text (see the module docstring for what it does)."""
    init = [f'    $sht(users=>{user}) = "{password}";' for user, password in users.items()]
    init += [f"    $sht(trusted=>{source}) = 1;" for source in trusted]
    values = {
        "PORT": str(port),
        "TLS_PORT": str(tls_port),
        "TCP": "disable_tcp=yes" if tls is None else _TLS_CORE,
        "TLS_LISTEN": "" if tls is None else f"listen=tls:127.0.0.1:{tls_port}\n",
        "TLS_MODULE": "" if tls is None else _TLS_MODULE % (tls.cert, tls.key),
        "REALM": realm,
        "MODULES": MODULES_DIR,
        "RPC_SOCKET": rpc_socket,
        "DEBUG": str(debug),
        "CHILDREN": str(children),
        "FR_INV_TIMER": str(int(ring_timeout * 1000)),
        "MIN_EXPIRES": str(min_expires),
        "MAX_EXPIRES": str(max_expires),
        # a REGISTER without Expires gets the default, at most max_expires
        "DEFAULT_EXPIRES": str(min(default_expires, max_expires or default_expires)),
        "INIT": "\n".join(init) or "    return;",
        "WIRE": "\\t".join(
            (
                _WIRE_MARK,
                "$sipdump(tag)",
                "$sipdump(src_ip):$sipdump(src_port)",
                "$sipdump(dst_ip):$sipdump(dst_port)",
                "$sipdump(proto)",
                "$sipdump(len)",
                "$(sipdump(buf){s.encode.base64})\\n",
            )
        ),
        "ON_BAD": (
            'send_reply("403", "Forbidden");'
            if bad_auth == 403
            else f'auth_challenge("{realm}", "1");'
        ),
    }
    text = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], _CONFIG)
    decide = (
        r'\1xlog("L_NOTICE", "'
        + _MARK
        + r'\\t\2\\t$rm\\t$fU\\t$tU\\t$ci\\t$cs\\t$si:$sp\\t\3\\n");'
    )
    return _DECIDE_RE.sub(decide, text)


# ==========================================================================
# the process
# ==========================================================================


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """SIGTERM kamailio's main process if the test process dies (Linux).

    SIGTERM, not SIGKILL: the main process then ends its children itself.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: kamailio process groups we started and have not reaped; SIGKILLed at exit
_LIVE: dict[int, asyncio.subprocess.Process] = {}


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL kamailio's process group (it leads a session of its own).

    Only while its main process is not reaped: until then the group id is ours.
    (Once reaped, its children are gone too: the main process ends them first.)
    """
    if proc.returncode is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    _LIVE.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        _kill_group(proc)


def _udp_bound(port: int) -> bool:
    try:
        text = Path("/proc/net/udp").read_text()
    except OSError:
        return False
    want = f"0100007F:{port:04X}"
    return any(line.split()[1:2] == [want] for line in text.splitlines()[1:])


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tcp_listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Kamailio:
    """Kamailio as registrar and proxy on 127.0.0.1; an async context manager.

    ``users``: ``{user: password}``, the digest users of ``realm`` (also the only
    users requests are routed to). ``trusted``: sources (``"ip"`` or ``"ip:port"``)
    whose initial requests other than REGISTER need no authentication.
    ``min_expires`` / ``max_expires`` / ``default_expires`` bound the registrations
    (seconds; ``max_expires=10`` makes every UA refresh within 10 s).
    ``bad_auth``: 401 (challenge again, Kamailio's default) or 403 for a wrong
    password or an unknown user. ``ring_timeout``: seconds an INVITE may go
    unanswered before Kamailio ends it with 408. ``tls``: a certificate and key
    (:mod:`peers.certs`) for a second, TLS socket (``tls_port``, URI
    :attr:`registrar_tls`) next to the UDP one; contacts registered over TLS
    are reached over TLS (Kamailio does not check their certificates).

    Attributes once started: ``port``, ``tls_port`` (0 without ``tls``), ``pid``,
    ``workdir`` (config, log), ``log_path``.
    """

    def __init__(
        self,
        tmp_path: Path,
        users: Mapping[str, str],
        *,
        realm: str = DEFAULT_REALM,
        trusted: Iterable[str] = (),
        min_expires: int = 1,
        max_expires: int = 3600,
        default_expires: int = 3600,
        bad_auth: int = 401,
        ring_timeout: float = 60.0,
        children: int = 2,
        debug: int = 2,
        shm_mb: int = 32,
        tls: Issued | None = None,
    ) -> None:
        binary = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/sbin")
        if binary is None:
            raise KamailioNotFoundError(
                "kamailio not found; install it (Debian/Ubuntu: apt-get install kamailio)"
            )
        for user, password in users.items():
            if not _NAME_RE.match(user):
                raise ValueError(f"user {user!r}: letters, digits and ._+- only")
            if not _PASSWORD_RE.match(password):
                raise ValueError(f"password of {user!r}: no spaces, quotes, backslashes or $")
        if not _NAME_RE.match(realm):
            raise ValueError(f"realm {realm!r}: letters, digits and ._+- only")
        trusted = tuple(trusted)
        for source in trusted:
            if not _TRUSTED_RE.match(source):
                raise ValueError(f"trusted source {source!r}: 'ip' or 'ip:port'")
        if bad_auth not in (401, 403):
            raise ValueError("bad_auth is 401 or 403")
        if not (0 < min_expires <= default_expires and 0 <= max_expires):
            raise ValueError("need 0 < min_expires <= default_expires, 0 <= max_expires")
        if 0 < max_expires < min_expires:
            raise ValueError("max_expires is below min_expires")
        self.binary = binary
        self.users = dict(users)
        self.realm = realm
        self.trusted = trusted
        self.min_expires = int(min_expires)
        self.max_expires = int(max_expires)
        self.default_expires = int(default_expires)
        self.bad_auth = bad_auth
        self.ring_timeout = float(ring_timeout)
        self.children = int(children)
        self.debug = int(debug)
        self.shm_mb = int(shm_mb)
        self.tls = tls
        self.tls_port = 0
        self.workdir = _make_workdir(Path(tmp_path))
        self.config_path = self.workdir / "kamailio.cfg"
        self.log_path = self.workdir / "kamailio.log"
        self.port = 0
        # Kamailio's runtime directory (pid file, JSON-RPC sockets): the work
        # directory, unless its path is too long for a socket (sun_path is 108
        # bytes); then a private directory in /tmp that stop() removes.
        self.rundir = self.workdir
        self._own_rundir = False
        self._proc: asyncio.subprocess.Process | None = None
        self._log_file: Any = None
        self._rpc_id = 0
        self._rpc_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------

    @property
    def pid_path(self) -> Path:
        return self.rundir / "kamailio.pid"

    @property
    def rpc_path(self) -> Path:
        return self.rundir / "rpc.sock"

    def command(self) -> list[str]:
        return [
            self.binary,
            "-f", str(self.config_path),
            "-DD",  # foreground: the creator neither forks away nor daemonizes
            "-E",  # log to stderr
            "-P", str(self.pid_path),
            "-Y", str(self.rundir),
            "-w", str(self.workdir),
            "-m", str(self.shm_mb),
            "-M", "8",
            "-a", "no",
        ]  # fmt: skip

    def render(self) -> str:
        return render_config(
            port=self.port,
            realm=self.realm,
            users=self.users,
            trusted=self.trusted,
            rpc_socket=str(self.rpc_path),
            min_expires=self.min_expires,
            max_expires=self.max_expires,
            default_expires=self.default_expires,
            bad_auth=self.bad_auth,
            ring_timeout=self.ring_timeout,
            children=self.children,
            debug=self.debug,
            tls_port=self.tls_port,
            tls=self.tls,
        )

    async def start(self) -> Kamailio:
        if self._proc is not None:
            raise RuntimeError("Kamailio already started")
        if len(str(self.workdir / "client.sock")) > 100:
            self.rundir = Path(tempfile.mkdtemp(prefix="kam-", dir="/tmp"))
            self._own_rundir = True
        last: Exception | None = None
        for _ in range(3):  # the port may be taken between picking and binding
            self.port = free_udp_port()
            if self.tls is not None:
                self.tls_port = _free_tcp_port()
            self.config_path.write_text(self.render())
            try:
                await self._spawn()
                return self
            except KamailioError as exc:
                last = exc
                await self.stop(keep_rundir=True)
                if "in use" not in str(exc):  # not a port taken under us: no retry
                    break
        self._remove_rundir()
        assert last is not None
        raise last

    async def _spawn(self) -> None:
        self._log_file = open(self.log_path, "ab")
        self._proc = await asyncio.create_subprocess_exec(
            *self.command(),
            cwd=str(self.workdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,
        )
        _LIVE[self._proc.pid] = self._proc
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.returncode is not None:
                raise KamailioError(self._failure(f"kamailio exited ({self._proc.returncode})"))
            if (
                _udp_bound(self.port)
                and (self.tls is None or _tcp_listening(self.tls_port))
                and self.rpc_path.exists()
            ):
                with contextlib.suppress(KamailioError, OSError, TimeoutError):
                    await self.rpc("core.version", timeout=0.5)
                    return
            if time.monotonic() > deadline:
                raise KamailioError(
                    self._failure(f"kamailio not up on udp {self.port} in {_START_TIMEOUT_S}s")
                )
            await asyncio.sleep(0.05)

    async def stop(self, *, keep_rundir: bool = False) -> None:
        """SIGTERM, then SIGKILL of the whole group after 3 s; safe to call twice."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), _TERM_GRACE_S)
                except TimeoutError:
                    _kill_group(proc)
                    await proc.wait()
        except BaseException:
            if proc is not None:
                _kill_group(proc)
            raise
        finally:
            if proc is not None:
                _LIVE.pop(proc.pid, None)
                self._returncode = proc.returncode
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if not keep_rundir:
                self._remove_rundir()

    def _remove_rundir(self) -> None:
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self._own_rundir = False
            self.rundir = self.workdir

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            _kill_group(proc)

    async def __aenter__(self) -> Kamailio:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _failure(self, what: str) -> str:
        return (
            f"{what}\ncommand: {' '.join(self.command())}\n"
            f"--- kamailio.log (tail) ---\n{_tail(self.log_path)}"
        )

    # -- addresses ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Kamailio's exit status once it has exited (None while it runs)."""
        if self._proc is not None:
            return self._proc.returncode
        return getattr(self, "_returncode", None)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def registrar(self) -> str:
        """The registrar's (and outbound proxy's) URI: ``sip:127.0.0.1:<port>``."""
        return f"sip:{HOST}:{self.port}"

    @property
    def registrar_tls(self) -> str:
        """The registrar's URI on its TLS socket (with ``tls``): ``sip:127.0.0.1:<tls_port>``."""
        return f"sip:{HOST}:{self.tls_port}"

    @property
    def proxy(self) -> str:
        """The outbound proxy URI for a Route set: ``sip:127.0.0.1:<port>;lr``."""
        return f"sip:{HOST}:{self.port};lr"

    def uri(self, user: str) -> str:
        """A request URI for ``user`` that reaches Kamailio without DNS."""
        return f"sip:{user}@{HOST}:{self.port}"

    def aor(self, user: str) -> str:
        """The address of record ``user`` registers: ``sip:<user>@<realm>``."""
        return f"sip:{user}@{self.realm}"

    # -- JSON-RPC -----------------------------------------------------------------

    async def rpc(self, method: str, *params: object, timeout: float = _RPC_TIMEOUT_S) -> Any:
        """Call a Kamailio RPC command (``ul.dump``, ``htable.sets``...); its ``result``.

        Raises :class:`KamailioError` with the error Kamailio returned.
        """
        async with self._rpc_lock:
            self._rpc_id += 1
            request = {"jsonrpc": "2.0", "method": method, "params": list(params),
                       "id": self._rpc_id}  # fmt: skip
            reply = await asyncio.wait_for(
                asyncio.to_thread(self._rpc_exchange, json.dumps(request).encode(), timeout),
                timeout + 1,
            )
        if "error" in reply:
            error = reply["error"]
            raise KamailioError(
                f"{method}{list(params)}: {error.get('code')} {error.get('message')}"
            )
        return reply.get("result")

    def _rpc_exchange(self, request: bytes, timeout: float) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            client = self.rundir / "client.sock"
            with contextlib.suppress(FileNotFoundError):
                client.unlink()
            sock.bind(str(client))
            try:
                sock.settimeout(timeout)
                sock.sendto(request, str(self.rpc_path))
                data = sock.recv(1 << 20)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    client.unlink()
        return dict(json.loads(data))

    async def contacts(self, user: str) -> list[Contact]:
        """The unexpired contacts registered for ``user`` (empty: not registered)."""
        try:
            result = await self.rpc("ul.lookup", "location", user)
        except KamailioError as exc:
            if "not found" in str(exc).lower():
                return []
            raise
        out: list[Contact] = []
        for item in (result or {}).get("Contacts", []):
            c = item.get("Contact", item)
            expires = c.get("Expires")
            # seconds left; usrloc says "permanent" for a contact that never expires
            left = expires if isinstance(expires, int) else _PERMANENT
            if left <= 0:  # expired, not yet swept by usrloc's timer
                continue
            out.append(
                Contact(
                    uri=str(c.get("Address", "")),
                    expires=left,
                    call_id=str(c.get("Call-ID", "")),
                    cseq=int(c.get("CSeq", 0) or 0),
                    user_agent=str(c.get("User-Agent", "")),
                    received=_set(c.get("Received")),
                    raw=c,
                )
            )
        return out

    async def wait_contacts(
        self, user: str, predicate: Callable[[list[Contact]], bool] = bool, timeout: float = 10.0
    ) -> list[Contact]:
        """Poll :meth:`contacts` until ``predicate`` holds (default: at least one)."""
        deadline = time.monotonic() + timeout
        while True:
            found = await self.contacts(user)
            if predicate(found):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"contacts of {user!r} not as wanted within {timeout}s: {found}\n"
                    f"--- log ---\n{self.log().describe()[-4000:]}"
                )
            await asyncio.sleep(0.1)

    async def drop_contacts(self, user: str) -> None:
        """Remove ``user``'s registrations (as if they had expired)."""
        with contextlib.suppress(KamailioError):
            await self.rpc("ul.rm", "location", user)

    async def set_user(self, user: str, password: str) -> None:
        """Add ``user`` or change its password, at once."""
        if not _NAME_RE.match(user) or not _PASSWORD_RE.match(password):
            raise ValueError(f"bad user or password for {user!r}")
        await self.rpc("htable.sets", "users", user, password)
        self.users[user] = password

    async def remove_user(self, user: str) -> None:
        """Forget ``user``: its REGISTERs fail, requests to it get 404."""
        await self.rpc("htable.delete", "users", user)
        self.users.pop(user, None)

    async def trust(self, source: str) -> None:
        """Let ``source`` (``"ip"`` or ``"ip:port"``) send requests without auth."""
        if not _TRUSTED_RE.match(source):
            raise ValueError(f"trusted source {source!r}: 'ip' or 'ip:port'")
        await self.rpc("htable.seti", "trusted", source, 1)
        self.trusted = (*self.trusted, source)

    # -- the log --------------------------------------------------------------------

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log(self) -> KamLog:
        """Kamailio's message log so far (see :class:`KamEvent`)."""
        return KamLog.parse(self.read_log())

    async def wait_log(self, predicate: Callable[[KamLog], bool], timeout: float = 10.0) -> KamLog:
        """Poll :meth:`log` until ``predicate`` holds; TimeoutError with the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if predicate(log):
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"kamailio log condition not met within {timeout}s\n"
                    f"--- events ---\n{log.describe()[-6000:]}\n"
                    f"--- kamailio.log (tail) ---\n{_tail(self.log_path, 2000)}"
                )
            await asyncio.sleep(0.05)


def _set(value: object) -> str:
    """An RPC field as a string; "" for Kamailio's ``[not set]``."""
    text = "" if value is None else str(value)
    return "" if text == "[not set]" else text


def _make_workdir(tmp_path: Path) -> Path:
    for i in range(1000):
        d = tmp_path / f"kamailio-{i}"
        try:
            d.mkdir(parents=True)
        except FileExistsError:
            continue
        return d
    raise RuntimeError(f"cannot create a kamailio work directory under {tmp_path}")
