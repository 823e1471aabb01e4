"""Gateway counters, served as Prometheus text at ``/metrics``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Counters of the front process. Plain integers: one event loop owns them."""

    calls_started: int = 0
    calls_active: int = 0
    calls_ended: Counter[str] = field(default_factory=Counter)  # by final SIP code
    calls_refused: Counter[str] = field(default_factory=Counter)  # by protocol error code
    setup_seconds_sum: float = 0.0
    setup_count: int = 0
    frames: Counter[str] = field(default_factory=Counter)  # uplink/downlink counters
    worker_deaths: int = 0
    websockets_active: int = 0

    def render(self) -> str:
        lines = [
            "# TYPE sipgw_calls_started_total counter",
            f"sipgw_calls_started_total {self.calls_started}",
            "# TYPE sipgw_calls_active gauge",
            f"sipgw_calls_active {self.calls_active}",
            "# TYPE sipgw_calls_ended_total counter",
            *(
                f'sipgw_calls_ended_total{{code="{c}"}} {n}'
                for c, n in sorted(self.calls_ended.items())
            ),
            "# TYPE sipgw_calls_refused_total counter",
            *(
                f'sipgw_calls_refused_total{{error="{c}"}} {n}'
                for c, n in sorted(self.calls_refused.items())
            ),
            "# TYPE sipgw_call_setup_seconds summary",
            f"sipgw_call_setup_seconds_sum {self.setup_seconds_sum:.6f}",
            f"sipgw_call_setup_seconds_count {self.setup_count}",
            "# TYPE sipgw_media_frames_total counter",
            *(
                f'sipgw_media_frames_total{{kind="{k}"}} {n}'
                for k, n in sorted(self.frames.items())
            ),
            "# TYPE sipgw_worker_deaths_total counter",
            f"sipgw_worker_deaths_total {self.worker_deaths}",
            "# TYPE sipgw_websockets_active gauge",
            f"sipgw_websockets_active {self.websockets_active}",
        ]
        return "\n".join(lines) + "\n"
