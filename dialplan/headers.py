"""Extra SIP headers on an INVITE: what a name and a value may be, and which names never.

Rules may add fixed headers (``headers = {"X-Trunk" = "east"}``, a
P-Asserted-Identity); a browser may add the ones a configured allow-list names.
Neither may touch the headers that route or identify the request itself.
"""

from __future__ import annotations

import re

#: A header name: an RFC 3261 token, restricted to letters, digits and dashes.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")
MAX_VALUE = 256
MAX_HEADERS = 8

#: Set by the SIP stack or routing; never from a rule or a browser (lower case).
CORE = frozenset(
    {
        "via", "v", "from", "f", "to", "t", "call-id", "i", "cseq", "contact", "m",
        "max-forwards", "content-length", "l", "content-type", "c", "route",
        "record-route", "authorization", "proxy-authorization", "require", "supported",
        "k", "allow", "session-expires", "x", "min-se", "refer-to", "r", "replaces",
        "event", "o", "expires",
    }
)  # fmt: skip
#: Identity headers: a rule may set them, a browser never.
IDENTITY = frozenset(
    {"p-asserted-identity", "p-preferred-identity", "remote-party-id", "diversion", "privacy"}
)


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be sent (None if it can): bad syntax or a core header."""
    if not _NAME.fullmatch(name):
        return "a header name is 1-64 letters, digits and dashes, starting with a letter"
    if name.lower() in CORE:
        return f"header {name} is set by the SIP stack"
    if len(value) > MAX_VALUE:
        return f"header {name}: the value is longer than {MAX_VALUE} characters"
    for char in value:
        if not char.isprintable() or not char.isascii():
            return (
                f"header {name}: the value has a character that is not allowed: U+{ord(char):04X}"
            )
    return None
