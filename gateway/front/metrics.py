"""The front's metrics, served as Prometheus text at ``/metrics`` (prometheus-client).

Each app has its own registry (no process-wide globals), so tests can build
several. Names keep the ``sipgw_`` prefix; counters get ``_total`` from the
library.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.outcomes import Ending, Refusal

#: Set-up time buckets, in seconds: loopback calls take tens of ms, a PBX seconds.
SETUP_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters of the front process, on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls_started = Counter("sipgw_calls_started", "Calls handed to a worker", registry=r)
        self.calls_active = Gauge("sipgw_calls_active", "Calls live now", registry=r)
        self.calls_active_by_worker = Gauge(
            "sipgw_worker_calls_active", "Calls live now, by worker", ["worker"], registry=r
        )
        self.calls_ended = Counter(
            "sipgw_calls_ended", "Calls ended, by the hangup code", ["code"], registry=r
        )
        self.calls_refused = Counter(
            "sipgw_calls_refused", "Calls refused, by protocol error code", ["error"], registry=r
        )
        self.outcomes = Counter(
            "sipgw_call_outcomes",
            "Calls ended or refused, by outcome (gateway.outcomes)",
            ["outcome"],
            registry=r,
        )
        self.setup_seconds = Histogram(
            "sipgw_call_setup_seconds",
            "From the browser's call request to the SIP answer",
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        self.frames = Counter(
            "sipgw_media_frames", "Media bridge frame counters", ["kind"], registry=r
        )
        self.worker_deaths = Counter(
            "sipgw_worker_deaths", "Worker processes that died", registry=r
        )
        self.websockets_active = Gauge(
            "sipgw_websockets_active", "WebSocket connections open now", registry=r
        )
        self.websockets_refused = Counter(
            "sipgw_websockets_refused",
            "WebSocket connections refused: origin (403), address_limit (429), unauthorized",
            ["reason"],
            registry=r,
        )
        self.messages_rate_limited = Counter(
            "sipgw_messages_rate_limited",
            "Messages refused with rate_limited (over http.max_messages_per_second)",
            registry=r,
        )

    def call_ended(self, result: Ending, stats: Mapping[str, int]) -> None:
        self.calls_ended.labels(str(result.code)).inc()
        self.outcomes.labels(result.label).inc()
        for kind, count in stats.items():
            self.frames.labels(kind).inc(count)

    def call_refused(self, refusal: Refusal) -> None:
        self.calls_refused.labels(refusal.error).inc()
        self.outcomes.labels(refusal.label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
