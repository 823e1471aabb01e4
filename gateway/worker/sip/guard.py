"""Answer unsolicited SIP requests before pjsua allocates anything for them.

pjsua opens an INVITE's RTP and RTCP sockets before ``onIncomingCall`` can
refuse it, and pjlib's ioqueue holds a closed socket's slot for 500 ms, so a
burst of INVITEs (about 30 in half a second) empties the 64-slot pool and
aborts the process. Refusing a body-less INVITE from inside ``onIncomingCall``
aborts it too (pjsua2's ``Endpoint::on_incoming_call`` frees the request it
already freed). pjsua2 offers no hook that runs earlier, so this module
registers a small pjsip module of its own through ``ctypes``.

At priority 40 the module sees only **new out-of-dialog requests**: the
transaction layer (16) has taken retransmissions and the UA layer (32) every
request with a To tag and every CANCEL; pjsua's own modules (64) come after.
Responses are never seen. For each request a :data:`Policy` decides: pass it
on to pjsua, answer it statelessly (no transaction, no dialog, no call slot,
no socket), or drop it. Everything runs on the pjsua2 owner thread, inside
``libHandleEvents``.

The module's layout is ``struct pjsip_module`` of pjproject 2.15 (unchanged
for many releases); ``tests/e2e/test_hostile_sip.py`` checks the behaviour.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pjsua2 as pj

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """Answer the request statelessly with ``code`` and ``reason``."""

    code: int
    reason: str


#: Let pjsua handle the request.
PASS = None
#: Consume the request without a response (an ACK, which has none).
DROP = Answer(0, "")

#: What to do with a new out-of-dialog request, given its method.
Policy = Callable[[str], Answer | None]


class _PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t)]


_ON_RX = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)  # pj_bool_t (*)(pjsip_rx_data *)


class _Module(ctypes.Structure):
    """``struct pjsip_module`` (pjsip/sip_module.h)."""

    _fields_ = [
        ("prev", ctypes.c_void_p),
        ("next", ctypes.c_void_p),
        ("name", _PjStr),
        ("id", ctypes.c_int),
        ("priority", ctypes.c_int),
        ("load", ctypes.c_void_p),
        ("start", ctypes.c_void_p),
        ("stop", ctypes.c_void_p),
        ("unload", ctypes.c_void_p),
        ("on_rx_request", _ON_RX),
        ("on_rx_response", ctypes.c_void_p),
        ("on_tx_request", ctypes.c_void_p),
        ("on_tx_response", ctypes.c_void_p),
        ("on_tsx_state", ctypes.c_void_p),
    ]


#: Offsets in ``pjsip_rx_data`` (pjsip/sip_transport.h, 64-bit, PJSIP_MAX_PKT_LEN 4000)
#: of ``pkt_info.packet``, ``pkt_info.src_name`` (char[46]) and ``pkt_info.src_port``.
#: Measured on the stock wheel; each read is checked (the packet must start with
#: the method) and a mismatch lets the request pass with a logged error.
PACKET_OFFSET = 320
SRC_NAME_OFFSET = 4368
SRC_NAME_LEN = 46
SRC_PORT_OFFSET = 4416


@dataclass(frozen=True)
class TrustedPeers:
    """Only these networks may send new requests; others get ``answer`` (DROP: none)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    answer: Answer = DROP

    @classmethod
    def parse(cls, cidrs: tuple[str, ...], code: int) -> TrustedPeers:
        networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        answer = Answer(code, "Forbidden") if code else DROP
        return cls(networks, answer)

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def source_of(rdata: int, method: str) -> str | None:
    """The source IP of ``rdata``, or None when the layout check fails."""
    head = ctypes.string_at(rdata + PACKET_OFFSET, len(method) + 1)
    if head != method.encode("ascii", "replace") + b" ":
        return None
    raw = ctypes.string_at(rdata + SRC_NAME_OFFSET, SRC_NAME_LEN)
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


#: Between pjsip's transaction/UA layers and pjsua's modules.
PRIORITY = 40


@functools.cache
def pjsua_library() -> Any:
    """The already-loaded pjsua2 extension, for the C calls pjsua2 does not wrap."""
    lib = ctypes.CDLL(pj._pjsua2.__file__)
    lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
    lib.pjsip_rx_data_get_info.argtypes = [ctypes.c_void_p]
    lib.pjsip_rx_data_get_info.restype = ctypes.c_char_p
    lib.pjsip_endpt_respond_stateless.argtypes = (
        [ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 3
    )
    lib.pjsip_endpt_register_module.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.pjsip_rdata_get_dlg.argtypes = [ctypes.c_void_p]
    lib.pjsip_rdata_get_dlg.restype = ctypes.c_void_p
    lib.pjsip_dlg_respond.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 3
    return lib


def method_of(info: bytes) -> str:
    """The method in ``pjsip_rx_data_get_info``'s text: ``Request msg INVITE/cseq=1 (...)``."""
    parts = info.split(b" ", 3)
    if len(parts) < 3 or parts[0] != b"Request":
        return ""
    return parts[2].split(b"/", 1)[0].decode("ascii", "replace")


class RequestGuard:
    """A pjsip module that applies ``policy`` to every new out-of-dialog request.

    Create it on the pjsua2 owner thread after ``libInit``; it must stay alive
    (its ctypes objects are pointed to by pjsip) until ``libDestroy`` returned.
    """

    def __init__(self, policy: Policy, trusted: TrustedPeers | None = None) -> None:
        self._policy = policy
        self._trusted = trusted
        self._lib = pjsua_library()
        self._endpoint = self._lib.pjsua_get_pjsip_endpt()
        self._reasons: dict[str, _PjStr] = {}
        self._keep: list[bytes] = []
        self.counts: dict[str, int] = {}
        self._callback = _ON_RX(self._on_rx_request)
        name = b"mod-sipgw-guard"
        self._keep.append(name)
        self._module = _Module(
            name=_PjStr(name, len(name)), id=-1, priority=PRIORITY, on_rx_request=self._callback
        )
        status = self._lib.pjsip_endpt_register_module(self._endpoint, ctypes.byref(self._module))
        if status != 0:
            raise RuntimeError(f"pjsip refused the request guard module (status {status})")

    def _reason(self, text: str) -> _PjStr:
        reason = self._reasons.get(text)
        if reason is None:
            raw = text.encode("ascii", "replace")
            self._keep.append(raw)
            reason = self._reasons[text] = _PjStr(raw, len(raw))
        return reason

    def _on_rx_request(self, rdata: int) -> int:
        # Called by pjsip from C: never let an exception escape.
        try:
            method = method_of(self._lib.pjsip_rx_data_get_info(rdata) or b"")
            self.counts[method] = self.counts.get(method, 0) + 1
            answer = self._policy(method)
            if self._trusted is not None and method:
                source = source_of(rdata, method)
                if source is None:
                    logger.error("request guard: rx_data layout mismatch; source not checked")
                elif not self._trusted.allows(source):
                    self.counts["untrusted"] = self.counts.get("untrusted", 0) + 1
                    answer = DROP if method == "ACK" else self._trusted.answer
            if answer is None:
                return 0
            if answer.code:
                self._lib.pjsip_endpt_respond_stateless(
                    self._endpoint,
                    rdata,
                    answer.code,
                    ctypes.addressof(self._reason(answer.reason)),
                    None,
                    None,
                )
            return 1
        except Exception:
            logger.exception("request guard failed; passing the request on")
            return 0
