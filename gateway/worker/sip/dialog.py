"""Read a call's SIP dialog from the raw messages pjsip sent and received.

pjsua2 does not expose dialog tags or route sets, but it hands over the whole
text of a transaction's last request and of a received response. This module
parses just enough of them (headers, including compact forms and folded lines)
to build an :class:`~gateway.ipc.Dialog`, which the front keeps so that it can
send BYE or CANCEL if the worker dies. Pure: no pjsua2.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.ipc import Dialog

#: RFC 3261 compact header names.
_COMPACT = {"i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact"}


def parse_headers(message: str) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the headers (lower-case names, folded lines joined)."""
    head = message.replace("\r\n", "\n").split("\n\n", 1)[0]
    lines = head.split("\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = name.strip().lower()
        headers.append((_COMPACT.get(key, key), value.strip()))
    return lines[0], headers


def split_values(value: str) -> list[str]:
    """Split a header value at commas outside ``<...>`` and quotes."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted = 0, False
    for char in value:
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "<":
            depth += 1
        elif not quoted and char == ">":
            depth = max(0, depth - 1)
        if char == "," and depth == 0 and not quoted:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, raw in headers if n == name for v in split_values(raw)]


def first(headers: list[tuple[str, str]], name: str) -> str:
    found = values(headers, name)
    return found[0] if found else ""


def uri_of(name_addr: str) -> str:
    """The URI of a name-addr (``"A" <sip:a@h>;tag=x``) or of a bare addr-spec."""
    if "<" in name_addr and ">" in name_addr:
        return name_addr[name_addr.index("<") + 1 : name_addr.index(">")]
    return name_addr.split(";", 1)[0].strip()


def has_tag(value: str) -> bool:
    params = value.rsplit(">", 1)[-1] if ">" in value else value
    return any(p.strip().lower().startswith("tag=") for p in params.split(";")[1:])


def from_invite(invite: str) -> Dialog | None:
    """The INVITE's half of the dialog (enough for a CANCEL)."""
    start, headers = parse_headers(invite)
    parts = start.split(" ")
    if len(parts) != 3 or parts[0] != "INVITE":
        return None
    cseq = first(headers, "cseq").split(" ", 1)[0]
    call_id = first(headers, "call-id")
    if not cseq.isdigit() or not call_id:
        return None
    return Dialog(
        call_id=call_id,
        local=first(headers, "from"),
        invite_to=first(headers, "to"),
        request_uri=parts[1],
        invite_via=first(headers, "via"),
        cseq=int(cseq),
        invite_routes=tuple(values(headers, "route")),
    )


def with_response(dialog: Dialog, response: str) -> Dialog | None:
    """``dialog`` completed by a response to its INVITE (``None`` if it forms none)."""
    start, headers = parse_headers(response)
    parts = start.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    code = int(parts[1])
    to = first(headers, "to")
    if not 100 < code < 300 or not has_tag(to) or first(headers, "call-id") != dialog.call_id:
        return None
    contact = first(headers, "contact")
    return replace(
        dialog,
        remote=to,
        remote_target=uri_of(contact) if contact else dialog.request_uri,
        # A UAC's route set is the Record-Route of the response, reversed.
        route_set=tuple(reversed(values(headers, "record-route"))),
        confirmed=code >= 200,
    )
