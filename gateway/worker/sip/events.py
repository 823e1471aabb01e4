"""Facts the pjsua2 owner thread hands to the worker's event loop.

Only these frozen dataclasses cross from the SIP thread into asyncio (through
``loop.call_soon_threadsafe``); nothing pjsua2-owned ever does. They report
what pjsip saw, not what it means for the call: :mod:`gateway.worker.call`
owns the call's state and maps these to an outcome through
:mod:`gateway.outcomes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.ipc import Dialog
from gateway.outcomes import Ending


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
class SipDisconnected:
    """pjsip ended the INVITE session: the last status code and reason (0 if none).

    ``replaced``: an attended transfer handed this call on (its far end got an
    INVITE with Replaces for it), so the BYE that ends it is the transfer's.
    ``transport_failed``: the INVITE transaction ended on a transport error (no
    response came; pjsip made up the code and reason).
    """

    key: int
    code: int
    reason: str
    replaced: bool = False
    transport_failed: bool = False


@dataclass(frozen=True)
class SipFailed:
    """The INVITE could not be started at all."""

    key: int
    ending: Ending


@dataclass(frozen=True)
class SipDialog:
    """The call's dialog formed (18x with a tag) or was confirmed (2xx)."""

    key: int
    dialog: Dialog


@dataclass(frozen=True)
class SipMediaTimeout:
    """No RTP arrived from the far end for ``seconds`` while the media was active."""

    key: int
    seconds: float


@dataclass(frozen=True)
class SipHold:
    """The call's media went on hold (``held``) or came back, by ``local`` or ``remote``."""

    key: int
    held: bool
    by: str


@dataclass(frozen=True)
class SipDtmf:
    """A digit from the far end: ``method`` is ``rfc4733`` or ``info``; duration in ms."""

    key: int
    digit: str
    method: str
    duration: int


@dataclass(frozen=True)
class SipTransfer:
    """A NOTIFY about the call's transfer (REFER): the new call's status; ``final`` ends it."""

    key: int
    code: int
    reason: str
    final: bool


@dataclass(frozen=True)
class SipTransferRequest:
    """The far end sent REFER to ``target``; it was declined (the front decides routes)."""

    key: int
    target: str


@dataclass(frozen=True)
class SipControlFailed:
    """A hold, unhold, DTMF or transfer request could not be carried out."""

    key: int
    action: str
    message: str


@dataclass(frozen=True)
class SipRegistration:
    """A registration's state changed: active (with its expiry) or not (with the code)."""

    reg: int
    active: bool
    code: int
    reason: str
    expires: int = 0


@dataclass(frozen=True)
class SipIncoming:
    """An INVITE for a registered user, now ringing (180 sent)."""

    key: int
    reg: int
    from_uri: str
    display_name: str
    to_uri: str


@dataclass(frozen=True)
class SipReleased:
    """pjsua2 freed the call slot (after the end, possibly much later)."""

    key: int


SipEvent = (
    SipProgress
    | SipAnswered
    | SipDisconnected
    | SipFailed
    | SipDialog
    | SipMediaTimeout
    | SipHold
    | SipDtmf
    | SipTransfer
    | SipTransferRequest
    | SipControlFailed
    | SipRegistration
    | SipIncoming
    | SipReleased
)
