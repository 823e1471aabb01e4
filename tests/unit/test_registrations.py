"""The front's registrations: sharing, refusals, failures and clean-up, with a fake pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.config import AccountConfig, RegistrarConfig
from gateway.front.registrations import (
    ACCOUNTS_PER_WORKER,
    RegistrationError,
    Registrations,
)
from gateway.ipc import Register, RegistrationChanged, ToWorker, Unregister


@dataclass(eq=False)
class Worker:
    index: int
    ready: bool = True


@dataclass
class Pool:
    sent: list[tuple[int, ToWorker]] = field(default_factory=list)

    def send(self, worker: Worker, message: ToWorker) -> bool:
        self.sent.append((worker.index, message))
        return worker.ready


@dataclass(eq=False)
class Owner:
    heard: list[tuple[str, ...]] = field(default_factory=list)

    def registered(self, user: str, expires: int, request_id: str | None) -> None:
        self.heard.append(("registered", user, str(expires), str(request_id)))

    def registration_failed(
        self, user: str, code: int, reason: str, request_id: str | None
    ) -> None:
        self.heard.append(("failed", user, str(code), str(request_id)))

    def unregistered(self, user: str, reason: str, request_id: str | None) -> None:
        self.heard.append(("unregistered", user, reason, str(request_id)))


REGISTRAR = RegistrarConfig(uri="sip:127.0.0.1:5070", domain="pbx.test")


@pytest.fixture
def setup() -> tuple[Registrations[Worker], Pool, list[Worker]]:
    pool, workers = Pool(), [Worker(0), Worker(1)]
    accounts = (AccountConfig(user="2000", password="server-side"),)
    return Registrations(REGISTRAR, accounts, pool, workers), pool, workers


def test_tabs_share_one_registration_and_the_last_one_out_unregisters(setup):
    regs, pool, _ = setup
    first, second = Owner(), Owner()
    regs.register(first, "1001", "pw", "", "r1")
    ((_, register),) = pool.sent
    assert isinstance(register, Register) and register.password == "pw"
    assert "pw" not in repr(register)  # never in a log line
    regs.on_changed(RegistrationChanged(register.reg, True, 200, "OK", 300))
    assert first.heard == [("registered", "1001", "300", "r1")]
    regs.register(second, "1001", "pw", "", "r2")
    assert second.heard == [("registered", "1001", "300", "r2")]
    assert len(pool.sent) == 1  # no second REGISTER
    regs.on_changed(RegistrationChanged(register.reg, True, 200, "OK", 300))  # a refresh
    assert len(first.heard) == 1  # refreshes are not news
    regs.disconnect(first)
    assert not [m for _, m in pool.sent if isinstance(m, Unregister)]
    regs.unregister(second, "1001", "u1")
    assert second.heard[-1] == ("unregistered", "1001", "unregistered", "u1")
    assert isinstance(pool.sent[-1][1], Unregister) and regs.count == 0


def test_refusals_name_the_problem(setup):
    regs, _, _ = setup
    owner, other = Owner(), Owner()
    regs.register(owner, "1001", "pw", "", None)
    with pytest.raises(RegistrationError) as twice:
        regs.register(owner, "1001", "pw", "", None)
    assert twice.value.code == "wrong_state"
    with pytest.raises(RegistrationError) as mismatch:
        regs.register(other, "1001", "other", "", None)
    assert mismatch.value.code == "forbidden"
    with pytest.raises(RegistrationError) as no_password:
        regs.register(other, "1002", None, "", None)
    assert no_password.value.code == "bad_request"
    with pytest.raises(RegistrationError) as unknown:
        regs.unregister(other, "1001", None)
    assert unknown.value.code == "not_found"
    none = Registrations(RegistrarConfig(), (), Pool(), [Worker(0)])
    with pytest.raises(RegistrationError) as unavailable:
        none.register(owner, "1001", "pw", "", None)
    assert unavailable.value.code == "unavailable"


def test_server_side_accounts_use_the_configured_password(setup):
    regs, pool, _ = setup
    regs.register(Owner(), "2000", None, "", None)
    register = pool.sent[-1][1]
    assert isinstance(register, Register) and register.password == "server-side"


def test_a_failure_is_heard_once_and_the_account_goes(setup):
    regs, pool, _ = setup
    owner = Owner()
    regs.register(owner, "1001", "wrong", "", "r1")
    reg = pool.sent[0][1].reg  # type: ignore[union-attr]
    regs.on_changed(RegistrationChanged(reg, False, 401, "Unauthorized"))
    assert owner.heard == [("failed", "1001", "401", "r1")]
    assert isinstance(pool.sent[-1][1], Unregister) and regs.count == 0
    regs.register(owner, "1001", "right", "", "r2")  # may try again
    assert regs.count == 1


def test_registrations_spread_over_workers_up_to_their_limit(setup):
    regs, pool, workers = setup
    for n in range(2 * ACCOUNTS_PER_WORKER):
        regs.register(Owner(), f"3{n:03d}", "pw", "", None)
    per_worker = [sum(1 for i, _ in pool.sent if i == w.index) for w in workers]
    assert per_worker == [ACCOUNTS_PER_WORKER, ACCOUNTS_PER_WORKER]
    with pytest.raises(RegistrationError) as full:
        regs.register(Owner(), "4000", "pw", "", None)
    assert full.value.code == "busy"


def test_a_dead_worker_loses_its_registrations(setup):
    regs, pool, workers = setup
    owner = Owner()
    regs.register(owner, "1001", "pw", "", None)
    reg = pool.sent[0][1].reg  # type: ignore[union-attr]
    regs.on_changed(RegistrationChanged(reg, True, 200, "OK", 300))
    regs.worker_lost(workers[pool.sent[0][0]])
    assert owner.heard[-1] == ("unregistered", "1001", "gateway worker restarted", "None")
    assert regs.count == 0 and regs.active_for(owner) is None
