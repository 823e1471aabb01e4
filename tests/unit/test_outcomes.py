"""The outcome table: every ending and refusal, and the protocol document's tables."""

from __future__ import annotations

import pickle
import re

import pytest
from conftest import ROOT

from gateway.front.signaling.messages import ERROR_CODES
from gateway.outcomes import (
    PJ_ETOOMANY,
    End,
    Ending,
    Refusal,
    ending,
    local_hangup,
    place_failed,
    sip_disconnected,
)

PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")

CASES = [
    # (id, ending, code, reason, by, label)
    ("cancel", local_hangup(answered=False), 487, "Request Terminated", "local", "local_cancel"),
    ("bye", local_hangup(answered=True), 200, "Normal call clearing", "local", "local_bye"),
    (
        "remote-bye",
        sip_disconnected(200, "Normal call clearing", answered=True),
        200,
        "Remote hangup (BYE)",
        "remote",
        "remote_bye",
    ),
    (
        "busy",
        sip_disconnected(486, "Busy Here", answered=False),
        486,
        "Busy Here",
        "remote",
        "remote_reject",
    ),
    (
        "reject-without-reason",
        sip_disconnected(603, "", answered=False),
        603,
        "SIP 603",
        "remote",
        "remote_reject",
    ),
    (
        "refresh-unanswered",
        sip_disconnected(408, "Request Timeout", answered=True),
        408,
        "Session timer expired (408 Request Timeout)",
        "gateway",
        "session_expired",
    ),
    (
        "408-before-answer-is-the-phones",
        sip_disconnected(408, "Request Timeout", answered=False),
        408,
        "Request Timeout",
        "remote",
        "remote_reject",
    ),
    (
        "transport",
        sip_disconnected(0, "", answered=False),
        500,
        "SIP transport error",
        "gateway",
        "transport_error",
    ),
    (
        "transport-with-reason",
        sip_disconnected(0, "Connection refused", answered=True),
        500,
        "Connection refused",
        "gateway",
        "transport_error",
    ),
    (
        "tls",
        sip_disconnected(
            503,
            "SSL certificate verification error (PJSIP_TLS_ECERTVERIF)",
            answered=False,
            tls_failed=True,
        ),
        503,
        "TLS connection to the SIP target failed: SSL certificate verification error "
        "(PJSIP_TLS_ECERTVERIF)",
        "gateway",
        "tls_failed",
    ),
    (
        "too-many",
        place_failed(PJ_ETOOMANY, "Too many objects"),
        503,
        "Call could not be placed: Too many objects",
        "gateway",
        "place_too_many",
    ),
    (
        "bad-uri",
        place_failed(171042, "Invalid Request URI"),
        400,
        "Call could not be placed: Invalid Request URI",
        "gateway",
        "place_bad_uri",
    ),
    (
        "other",
        place_failed(120001, "Operation not permitted"),
        500,
        "Call could not be placed: Operation not permitted",
        "gateway",
        "place_failed",
    ),
    (
        "timeout",
        ending(End.INVITE_TIMEOUT),
        408,
        "Request Timeout (no answer from the SIP target)",
        "gateway",
        "invite_timeout",
    ),
    ("ice", ending(End.ICE_FAILED), 480, "ICE connection failed", "gateway", "ice_failed"),
    (
        "worker",
        ending(End.WORKER_DIED),
        500,
        "Gateway worker stopped unexpectedly",
        "gateway",
        "worker_died",
    ),
    ("shutdown", ending(End.SHUTDOWN), 503, "Gateway shutting down", "gateway", "shutdown"),
]


@pytest.mark.parametrize(
    ("result", "code", "reason", "by", "label"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_way_a_call_ends(result: Ending, code: int, reason: str, by: str, label: str) -> None:
    assert (result.code, result.reason, result.by, result.label) == (code, reason, by, label)


def test_endings_and_refusals_survive_the_worker_pipe() -> None:
    for kind in End:
        assert pickle.loads(pickle.dumps(ending(kind, 499, "x"))) == ending(kind, 499, "x")
    for refusal in Refusal:
        assert pickle.loads(pickle.dumps(refusal)) is refusal


def test_every_refusal_uses_a_documented_error_code() -> None:
    assert {r.error for r in Refusal} <= set(ERROR_CODES)
    assert len({r.label for r in Refusal}) == len(Refusal)
    assert len({e.label for e in End}) == len(End)


def _table(after: str) -> list[list[str]]:
    """The rows of the first Markdown table after the line ``after``, cells unquoted."""
    text = PROTOCOL[PROTOCOL.index(after) :]
    rows = []
    for line in text.splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows.append(cells)
    return rows[1:]  # without the header


def test_the_endings_table_in_the_protocol_document_matches() -> None:
    documented = {row[0]: row[1:4] for row in _table("Every way a call ends, one row each.")}
    assert set(documented) == {e.label for e in End}
    for kind in End:
        code, by, reason = documented[kind.label]
        row = kind.value
        assert by == row.by, kind
        if row.code:
            assert int(code) == row.code, kind
            assert reason.startswith(row.reason.rstrip(".")) or row.reason in reason, kind
        else:
            assert code == "the response's", kind


def test_the_refusals_table_in_the_protocol_document_matches() -> None:
    rows = _table("A `call` that never starts is refused for one of these reasons")
    assert {row[0]: row[1] for row in rows} == {r.label: r.error for r in Refusal}


def test_the_error_codes_table_lists_exactly_the_codes_sent() -> None:
    rows = _table("Error codes:")
    assert [row[0] for row in rows] == list(ERROR_CODES)
    assert re.search(r"sipgw_call_outcomes_total\{outcome\}", PROTOCOL)
