"""The front's call manager, driven directly: no sockets, no processes.

A fake pool stands behind the manager's three-method interface and records the
commands it would send; a fake owner records what the manager tells a session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from dialplan import load_rules
from gateway.front.calls import AlreadyEnding, CallManager, Grant, UnknownCall, refer_target
from gateway.front.metrics import Metrics
from gateway.ipc import (
    CallAccepted,
    CallAnswer,
    CallEnded,
    CallProgress,
    CallRefused,
    CallReleased,
    EndCall,
    StartCall,
    ToWorker,
)
from gateway.outcomes import End, Ending, Refusal, Refused, ending

RULES = load_rules(
    [
        {"name": "echo", "exact": "echo", "target": "sip:echo@{embedded}"},
        {"name": "blocked", "prefix": "900", "reject": 403, "reason": "premium"},
    ],
    ("embedded",),
)


@dataclass(eq=False)
class FakeWorker:
    index: int
    capacity: int = 4
    slots: set[int] = field(default_factory=set)
    reachable: bool = True


@dataclass
class FakePool:
    workers: list[FakeWorker] = field(default_factory=lambda: [FakeWorker(0), FakeWorker(1)])
    ready: bool = True
    sent: list[tuple[int, ToWorker]] = field(default_factory=list)

    def acquire(
        self, key: int, only: FakeWorker | None = None, prefer: FakeWorker | None = None
    ) -> FakeWorker:
        if not self.ready:
            raise Refused(Refusal.NO_WORKER, "no worker")
        free = [w for w in self.workers if len(w.slots) < w.capacity and only in (None, w)]
        if not free:
            raise Refused(Refusal.NO_CAPACITY, "full")
        worker = min(free, key=lambda w: len(w.slots))
        worker.slots.add(key)
        return worker

    def release(self, worker: FakeWorker, key: int) -> None:
        worker.slots.discard(key)

    def send(self, worker: FakeWorker, message: ToWorker) -> bool:
        if not worker.reachable:
            return False
        self.sent.append((worker.index, message))
        return True

    def starts(self) -> list[StartCall]:
        return [m for _, m in self.sent if isinstance(m, StartCall)]

    def ends(self) -> list[EndCall]:
        return [m for _, m in self.sent if isinstance(m, EndCall)]


@dataclass(eq=False)
class FakeOwner:
    heard: list[tuple[Any, ...]] = field(default_factory=list)

    def call_answered(self, call_id: str, sdp: str, request_id: str | None) -> None:
        self.heard.append(("answered", call_id, sdp, request_id))

    def call_progress(self, call_id: str, code: int, reason: str) -> None:
        self.heard.append(("progress", call_id, code, reason))

    def call_accepted(self, call_id: str, webrtc_codec: str, sip_codec: str) -> None:
        self.heard.append(("accepted", call_id, webrtc_codec, sip_codec))

    def call_ended(self, call_id: str, result: Ending, request_id: str | None) -> None:
        self.heard.append(("ended", call_id, result.label, result.code, request_id))

    def call_refused(
        self, call_id: str, refusal: Refusal, message: str, request_id: str | None
    ) -> None:
        self.heard.append(("refused", call_id, refusal.label, request_id))


@pytest.fixture
def pool() -> FakePool:
    return FakePool()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(pool: FakePool, metrics: Metrics, clock: FakeClock) -> CallManager[FakeWorker]:
    return CallManager(pool, RULES, {"embedded": "127.0.0.1:5070"}, metrics, 3, 5, clock)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def refusal_of(manager: CallManager[FakeWorker], owner: FakeOwner, call: str, to: str) -> Refusal:
    with pytest.raises(Refused) as refused:
        manager.place(owner, call, to, "v=0\r\n", "r1")
    return refused.value.refusal


def test_a_call_is_routed_started_and_followed_to_its_end(manager, pool, metrics):
    owner = FakeOwner()
    manager.place(owner, "c1", "echo", "offer", "r1")
    (start,) = pool.starts()
    assert (start.uri, start.offer_sdp) == ("sip:echo@127.0.0.1:5070", "offer")
    worker = next(w for w in pool.workers if start.key in w.slots)
    manager.on_worker_message(worker, CallAnswer(start.key, "answer"))
    manager.on_worker_message(worker, CallProgress(start.key, 180, "Ringing"))
    manager.on_worker_message(worker, CallAccepted(start.key, "opus/48000", "PCMU/8000"))
    manager.hangup(owner, "c1", "r2")
    assert pool.ends() == [EndCall(start.key)]
    with pytest.raises(AlreadyEnding):
        manager.hangup(owner, "c1", "r3")
    local_bye = ending(End.LOCAL_BYE)
    manager.on_worker_message(worker, CallEnded(start.key, local_bye, {"uplink_frames": 5}))
    assert owner.heard == [
        ("answered", "c1", "answer", "r1"),
        ("progress", "c1", 180, "Ringing"),
        ("accepted", "c1", "opus/48000", "PCMU/8000"),
        ("ended", "c1", "local_bye", 200, "r2"),
    ]
    assert manager.active == 0
    assert start.key in worker.slots  # until the worker releases it
    manager.on_worker_message(worker, CallReleased(start.key))
    assert start.key not in worker.slots
    assert sample(metrics, "sipgw_call_outcomes_total", outcome="local_bye") == 1
    assert sample(metrics, "sipgw_calls_ended_total", code="200") == 1
    assert sample(metrics, "sipgw_media_frames_total", kind="uplink_frames") == 5
    assert sample(metrics, "sipgw_call_setup_seconds_count") == 1
    assert sample(metrics, "sipgw_calls_active") == 0


def test_remote_ending_carries_no_request_id(manager, pool):
    owner = FakeOwner()
    manager.place(owner, "c1", "echo", "offer", "r1")
    (start,) = pool.starts()
    manager.hangup(owner, "c1", "r2")
    busy = ending(End.REMOTE_REJECT, 486, "Busy Here")
    manager.on_worker_message(pool.workers[0], CallEnded(start.key, busy))
    assert owner.heard[-1] == ("ended", "c1", "remote_reject", 486, None)


REFUSALS = [
    ("no-route", "12345", Refusal.NO_ROUTE),
    ("dialplan-reject", "900123", Refusal.DIALPLAN_REJECT),
    ("bad-number", "echo\r\nX: y", Refusal.BAD_NUMBER),
    ("empty-number", "", Refusal.BAD_NUMBER),
]


@pytest.mark.parametrize(("to", "refusal"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_the_dialplan_refuses_before_anything_is_sent(manager, pool, metrics, to, refusal):
    assert refusal_of(manager, FakeOwner(), "c1", to) is refusal
    assert pool.sent == []
    assert manager.active == 0
    assert sample(metrics, "sipgw_calls_refused_total", error=refusal.error) == 1
    assert sample(metrics, "sipgw_call_outcomes_total", outcome=refusal.label) == 1


def test_no_capacity_then_no_worker(manager, pool):
    owner = FakeOwner()
    for worker in pool.workers:
        worker.capacity = 1
    manager.place(owner, "a", "echo", "offer", None)
    manager.place(FakeOwner(), "b", "echo", "offer", None)
    assert refusal_of(manager, owner, "c", "echo") is Refusal.NO_CAPACITY
    pool.ready = False
    assert refusal_of(manager, owner, "d", "echo") is Refusal.NO_WORKER
    assert len(pool.starts()) == 2


def test_call_requests_are_paced_per_connection(manager, pool, clock):
    owner = FakeOwner()
    for i in range(5):  # refused ones count too: a flood of bad numbers is a flood
        refusal_of(manager, owner, f"x{i}", "12345")
    assert refusal_of(manager, owner, "c1", "echo") is Refusal.CONNECTION_RATE
    manager.place(FakeOwner(), "c1", "echo", "offer", None)  # other connections are not
    clock.now += 1.0
    manager.place(owner, "c1", "echo", "offer", None)
    assert len(pool.starts()) == 2


def test_an_unreachable_worker_gives_its_slot_back(manager, pool):
    for worker in pool.workers:
        worker.reachable = False
    assert refusal_of(manager, FakeOwner(), "c1", "echo") is Refusal.WORKER_UNREACHABLE
    assert all(not w.slots for w in pool.workers)
    assert manager.active == 0


def test_call_ids_are_never_reused_and_connections_are_limited(manager, pool, clock):
    owner = FakeOwner()
    manager.place(owner, "c1", "echo", "offer", None)
    assert refusal_of(manager, owner, "c1", "echo") is Refusal.DUPLICATE_ID
    manager.place(FakeOwner(), "c1", "echo", "offer", None)  # another connection may
    manager.place(owner, "c2", "echo", "offer", None)
    manager.place(owner, "c3", "echo", "offer", None)
    assert refusal_of(manager, owner, "c4", "echo") is Refusal.CONNECTION_LIMIT
    assert manager.live_calls(owner) == 3
    clock.now += 1.0  # past the per-connection rate window
    # A refused id is not used up; an ended one stays used.
    first = pool.starts()[0]
    manager.on_worker_message(pool.workers[0], CallEnded(first.key, ending(End.REMOTE_BYE)))
    manager.place(owner, "c4", "echo", "offer", None)
    assert refusal_of(manager, owner, "c1", "echo") is Refusal.DUPLICATE_ID


def test_a_refusal_from_the_worker_reaches_the_owner(manager, pool, metrics):
    owner = FakeOwner()
    manager.place(owner, "c1", "echo", "garbage", "r1")
    (start,) = pool.starts()
    manager.on_worker_message(
        pool.workers[0], CallRefused(start.key, Refusal.BAD_OFFER, "offer has no audio section")
    )
    assert owner.heard == [("refused", "c1", "bad_offer", "r1")]
    assert manager.active == 0
    assert sample(metrics, "sipgw_calls_refused_total", error="bad_request") == 1


def test_hangup_of_an_unknown_call(manager):
    with pytest.raises(UnknownCall):
        manager.hangup(FakeOwner(), "nope", None)


def test_a_dead_worker_ends_only_its_own_calls(manager, pool, metrics):
    owner = FakeOwner()
    manager.place(owner, "a", "echo", "offer", None)
    manager.place(owner, "b", "echo", "offer", None)
    on_0 = {m.key for i, m in pool.sent if i == 0}
    manager.on_worker_lost(pool.workers[0])
    ended = [h for h in owner.heard if h[0] == "ended"]
    assert len(ended) == len(on_0) == 1
    assert ended[0][2:4] == ("worker_died", 500)
    assert manager.active == 1
    assert sample(metrics, "sipgw_worker_deaths_total") == 1
    assert sample(metrics, "sipgw_worker_calls_active", worker="0") == 0
    assert sample(metrics, "sipgw_worker_calls_active", worker="1") == 1


def test_a_closed_connection_ends_its_calls_silently(manager, pool):
    owner, other = FakeOwner(), FakeOwner()
    manager.place(owner, "a", "echo", "offer", None)
    manager.place(other, "b", "echo", "offer", None)
    manager.disconnect(owner)
    (end,) = pool.ends()
    assert end.ending == ending(End.WEBSOCKET_CLOSED)  # counted apart from hangups
    manager.on_worker_message(pool.workers[0], CallEnded(end.key, end.ending))
    assert owner.heard == []  # nobody is listening
    assert manager.active == 1


async def test_shutdown_ends_every_call_and_refuses_new_ones(manager, pool):
    owner = FakeOwner()
    manager.place(owner, "a", "echo", "offer", None)
    manager.place(owner, "b", "echo", "offer", None)
    manager.hangup(owner, "b", None)  # already ending: keeps its own result
    shutdown = ending(End.SHUTDOWN)
    manager.end_all(shutdown)
    assert [e.ending for e in pool.ends()] == [None, shutdown]
    assert refusal_of(manager, owner, "c", "echo") is Refusal.SHUTTING_DOWN
    assert not await manager.wait_idle(0.01)
    for end in pool.ends():
        manager.on_worker_message(pool.workers[0], CallEnded(end.key, shutdown))
    assert await manager.wait_idle(0.01)


def test_one_log_line_when_a_call_ends_and_when_one_is_refused(manager, pool, caplog):
    caplog.set_level("INFO", logger="gateway.front.calls")
    owner = FakeOwner()
    manager.place(owner, "c1", "echo", "offer", None)
    (start,) = pool.starts()
    caplog.clear()
    busy = ending(End.REMOTE_REJECT, 486, "Busy Here")
    manager.on_worker_message(pool.workers[0], CallEnded(start.key, busy))
    (line,) = caplog.messages
    assert line.startswith(f"call {start.key} (c1) ended: 486 Busy Here, by remote, after ")
    assert line.endswith(" s (target sip:echo@127.0.0.1:5070)")
    caplog.clear()
    refusal_of(manager, owner, "c2", "900555")
    assert caplog.messages == ["call c2 to '900555' refused: forbidden (dialplan_reject)"]


def test_a_tokens_grant_narrows_routes_and_calls(pool, metrics, clock):
    wall = FakeClock(5000.0)
    manager = CallManager(
        pool, RULES, {"embedded": "127.0.0.1:5070"}, metrics, 3, 5, clock, wall_clock=wall
    )
    owner = FakeOwner()
    only_blocked = Grant("alice", dial=frozenset({"blocked"}))
    with pytest.raises(Refused) as refused:
        manager.place(owner, "c1", "echo", "offer", "r1", grant=only_blocked)
    assert refused.value.refusal is Refusal.TOKEN_DIAL
    assert "echo" in refused.value.message and "rule" not in refused.value.message
    assert pool.sent == []
    # The dialplan's own refusals come first: an unrouted number is still no_route.
    with pytest.raises(Refused) as refused:
        manager.place(owner, "c1", "12345", "offer", "r1", grant=only_blocked)
    assert refused.value.refusal is Refusal.NO_ROUTE
    one_call = Grant("alice", dial=frozenset({"echo"}), max_calls=1, expires=5001.0)
    manager.place(owner, "c1", "echo", "offer", "r1", grant=one_call)
    with pytest.raises(Refused) as refused:
        manager.place(owner, "c2", "echo", "offer", "r2", grant=one_call)
    assert refused.value.refusal is Refusal.TOKEN_CALL_LIMIT
    wall.now = 5001.0
    with pytest.raises(Refused) as refused:
        manager.place(FakeOwner(), "c3", "echo", "offer", "r3", grant=one_call)
    assert refused.value.refusal is Refusal.TOKEN_EXPIRED
    assert len(pool.starts()) == 1
    assert sample(metrics, "sipgw_call_outcomes_total", outcome="token_dial") == 1
    assert sample(metrics, "sipgw_calls_refused_total", error="unauthorized") == 1
    # No grant (auth off): as before.
    manager.place(FakeOwner(), "c4", "echo", "offer", "r4")
    assert len(pool.starts()) == 2


@pytest.mark.parametrize(
    "uri, number",
    [
        ("<sip:1003@pbx.example;transport=udp>", "1003"),
        ("sip:+441632960123@192.0.2.1:5060?Replaces=abc%40host", "+441632960123"),
        ("sips:sales@pbx", "sales"),
        ("tel:+15550100;phone-context=x", "+15550100"),
        ("sip:pbx.example", None),
        ("http://1003@x", None),
        ("sip:10%0d03@x", None),
        ("sip:" + "9" * 65 + "@x", None),
        ("", None),
    ],
)
def test_refer_target_keeps_only_the_number(uri, number):
    assert refer_target(uri) == number


def test_a_dial_claim_allows_rule_names_and_e164_prefixes():
    from dialplan import load_rules, route
    from gateway.front.calls import _granted

    rules = load_rules(
        [
            {"name": "us", "e164": "+1", "countries": ["US"], "target": "sip:{e164}@t"},
            {"name": "ext", "regex": "[0-9]{4}", "target": "sip:{number}@pbx"},
        ],
        region="US",
    )
    toll_free = route("18002345678", rules)
    landline = route("2025550123", rules)
    extension = route("1001", rules)
    assert _granted(toll_free, frozenset({"+1800"}))
    assert not _granted(landline, frozenset({"+1800"}))
    assert _granted(landline, frozenset({"us"}))
    assert not _granted(extension, frozenset({"+1", "us"}))  # no E.164 for an extension
    assert _granted(extension, frozenset({"ext"}))
