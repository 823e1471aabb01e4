"""Events the pjsua2 owner thread hands to the worker's event loop.

Only these frozen dataclasses cross from the SIP thread into asyncio (through
``loop.call_soon_threadsafe``); nothing pjsua2-owned ever does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Who ended a call: the browser side, the SIP side, or the gateway itself.
EndedBy = Literal["local", "remote", "gateway"]


@dataclass(frozen=True)
class SipProgress:
    """A provisional response (180 Ringing, 183 Session Progress, ...)."""

    key: int
    code: int
    reason: str


@dataclass(frozen=True)
class SipAnswered:
    """The call was answered (200 OK, ACK sent); ``codec`` is e.g. ``PCMU/8000``."""

    key: int
    codec: str


@dataclass(frozen=True)
class SipEnded:
    """The SIP leg is over, as far as the browser is concerned. Sent once per call."""

    key: int
    code: int
    reason: str
    by: EndedBy


@dataclass(frozen=True)
class SipReleased:
    """pjsua2 freed the call slot (after :class:`SipEnded`, possibly much later)."""

    key: int


SipEvent = SipProgress | SipAnswered | SipEnded | SipReleased
