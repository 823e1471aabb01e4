"""Browser users registered to the PBX through the gateway: who, where, for whom.

One registration per user name, held by one worker (its pjsua2 account there);
every connection that registered that user shares it and hears its incoming
calls. The last connection to leave unregisters it. No I/O: the pool sends,
the owners (signaling sessions) turn the news into wire messages.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, Protocol, TypeVar

from gateway.config import AccountConfig, RegistrarConfig
from gateway.ipc import Register, RegistrationChanged, ToWorker, Unregister

logger = logging.getLogger(__name__)

#: pjsua accounts one process may hold (PJSUA_MAX_ACC in the pjsua2 wheel).
PJSUA_MAX_ACC = 8
#: User accounts one worker holds: the worker's own identity takes one of the 8
#: (two with ``sip.transport = "tls"``, see :attr:`SipConfig.own_accounts`).
ACCOUNTS_PER_WORKER = PJSUA_MAX_ACC - 1


class WorkerRef(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def ready(self) -> bool: ...


W = TypeVar("W", bound=WorkerRef)
W_contra = TypeVar("W_contra", bound=WorkerRef, contravariant=True)


class Sender(Protocol[W_contra]):
    def send(self, worker: W_contra, message: ToWorker) -> bool: ...


class RegistrationOwner(Protocol):
    """A signaling session, told about its registrations."""

    def registered(self, user: str, expires: int, request_id: str | None) -> None: ...

    def registration_failed(
        self, user: str, code: int, reason: str, request_id: str | None
    ) -> None: ...

    def unregistered(self, user: str, reason: str, request_id: str | None) -> None: ...


class RegistrationError(Exception):
    """A ``register``/``unregister`` the gateway refuses; ``code`` is the protocol error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RegState(Enum):
    PENDING = "pending"  # REGISTER sent, no final answer yet
    ACTIVE = "active"


@dataclass(eq=False)
class Registration(Generic[W]):
    reg: int
    user: str
    worker: W
    #: What the browser gave (compared when another tab registers the same user).
    password: str = field(repr=False)
    state: RegState = RegState.PENDING
    expires: int = 0
    #: Connections sharing it, with the id of their pending ``register`` request.
    owners: dict[RegistrationOwner, str | None] = field(default_factory=dict)


class Registrations(Generic[W]):
    """Every registration of the gateway."""

    def __init__(
        self,
        registrar: RegistrarConfig,
        accounts: tuple[AccountConfig, ...],
        pool: Sender[W],
        workers: list[W],
        per_worker: int = ACCOUNTS_PER_WORKER,
    ) -> None:
        self._registrar = registrar
        self._per_worker = per_worker
        self._accounts = {a.user: a for a in accounts}
        self._pool = pool
        self._workers = workers
        self._regs = itertools.count(1)
        self._by_user: dict[str, Registration[W]] = {}
        self._by_reg: dict[int, Registration[W]] = {}

    @property
    def count(self) -> int:
        return len(self._by_reg)

    def active_for(self, owner: RegistrationOwner) -> tuple[int, W] | None:
        """The registration number and worker of ``owner``'s active registration, if any."""
        for registration in self._by_reg.values():
            if owner in registration.owners and registration.state is RegState.ACTIVE:
                return registration.reg, registration.worker
        return None

    def owners(self, reg: int) -> list[RegistrationOwner]:
        registration = self._by_reg.get(reg)
        return list(registration.owners) if registration else []

    def register(
        self,
        owner: RegistrationOwner,
        user: str,
        password: str | None,
        display_name: str,
        request_id: str | None,
        subject: str | None = None,
    ) -> None:
        """Register ``user`` for ``owner`` (or join its registration); raises RegistrationError.

        ``subject`` is the ``sub`` of the owner's token (``None`` with auth off): a
        server-side account is registered only for the subjects it is bound to.
        """
        if not self._registrar.uri:
            raise RegistrationError("unavailable", "register: this gateway has no registrar")
        account = self._accounts.get(user)
        if account is not None and not account.may_register(subject):
            raise RegistrationError(
                "forbidden", f"register: account {user!r} is not bound to this token's user"
            )
        if account is not None:
            secret, auth_user = account.secret(), account.auth_user
            display_name = display_name or account.display_name
        elif password is None:
            raise RegistrationError(
                "bad_request", f"register: {user!r} is not a server-side account: give a password"
            )
        else:
            secret, auth_user = password, ""
        existing = self._by_user.get(user)
        if existing is not None:
            if owner in existing.owners:
                raise RegistrationError("wrong_state", f"register: {user!r} is already registered")
            if account is None and existing.password != secret:
                raise RegistrationError(
                    "forbidden", f"register: {user!r} is registered with another password"
                )
            existing.owners[owner] = request_id
            if existing.state is RegState.ACTIVE:
                existing.owners[owner] = None
                owner.registered(user, existing.expires, request_id)
            return
        worker = self._pick_worker()
        reg = next(self._regs)
        registration = Registration(reg, user, worker, secret, owners={owner: request_id})
        if not self._pool.send(worker, Register(reg, user, secret, auth_user, display_name)):
            raise RegistrationError("unavailable", "register: the gateway worker is restarting")
        self._by_user[user] = registration
        self._by_reg[reg] = registration
        logger.info("registering %s (registration %s) on worker %s", user, reg, worker.index)

    def _pick_worker(self) -> W:
        counts: dict[int, int] = {}
        for registration in self._by_reg.values():
            index = registration.worker.index
            counts[index] = counts.get(index, 0) + 1
        ready = [w for w in self._workers if w.ready]
        room = [w for w in ready if counts.get(w.index, 0) < self._per_worker]
        if not room:
            raise RegistrationError(
                "busy", "register: every gateway worker holds its maximum of registrations"
            )
        return min(room, key=lambda w: (counts.get(w.index, 0), w.index))

    def unregister(self, owner: RegistrationOwner, user: str, request_id: str | None) -> None:
        registration = self._by_user.get(user)
        if registration is None or owner not in registration.owners:
            raise RegistrationError("not_found", f"unregister: {user!r} is not registered here")
        del registration.owners[owner]
        owner.unregistered(user, "unregistered", request_id)
        if not registration.owners:
            self._drop(registration)

    def disconnect(self, owner: RegistrationOwner) -> None:
        """The owner's connection closed: it leaves every registration it shared."""
        for registration in list(self._by_reg.values()):
            if registration.owners.pop(owner, ...) is not ... and not registration.owners:
                self._drop(registration)

    def on_changed(self, message: RegistrationChanged) -> None:
        registration = self._by_reg.get(message.reg)
        if registration is None:
            return
        user = registration.user
        if message.active:
            was_active = registration.state is RegState.ACTIVE
            registration.state, registration.expires = RegState.ACTIVE, message.expires
            for owner, request_id in list(registration.owners.items()):
                if not was_active or request_id is not None:
                    owner.registered(user, message.expires, request_id)
                registration.owners[owner] = None
            if not was_active:
                logger.info("%s registered (expires %s s)", user, message.expires)
            return
        # Failed, or lost on a refresh: everyone hears it, the account goes.
        logger.info("registration of %s ended: %s %s", user, message.code, message.reason)
        for owner, request_id in registration.owners.items():
            if registration.state is RegState.PENDING:
                owner.registration_failed(user, message.code, message.reason, request_id)
            else:
                owner.unregistered(user, f"{message.code} {message.reason}", None)
        registration.owners.clear()
        self._drop(registration)

    def worker_lost(self, worker: W) -> None:
        for registration in [r for r in self._by_reg.values() if r.worker is worker]:
            for owner, request_id in registration.owners.items():
                if registration.state is RegState.PENDING:
                    owner.registration_failed(
                        registration.user, 500, "Gateway worker stopped unexpectedly", request_id
                    )
                else:
                    owner.unregistered(registration.user, "gateway worker restarted", None)
            self._by_reg.pop(registration.reg, None)
            self._by_user.pop(registration.user, None)

    def _drop(self, registration: Registration[W]) -> None:
        self._by_reg.pop(registration.reg, None)
        if self._by_user.get(registration.user) is registration:
            del self._by_user[registration.user]
        self._pool.send(registration.worker, Unregister(registration.reg))
        logger.info("unregistering %s (registration %s)", registration.user, registration.reg)
