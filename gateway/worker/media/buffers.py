"""A bounded frame queue shared by one producer thread and one consumer thread.

The SIP leg's media callbacks run on pjmedia's clock thread and must stay
constant-time, so the hand-over is a ``collections.deque`` (whose ``append``
and ``popleft`` are atomic under the GIL): no lock, no allocation beyond the
frame itself. When the producer runs ahead the oldest frames are dropped, which
keeps the added latency at ``depth`` frames at most.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BufferStats:
    """Frame counts of one direction of one call."""

    pushed: int
    popped: int
    #: Frames asked for when none was there (the consumer played silence).
    missing: int
    #: Frames dropped because the consumer fell behind.
    dropped: int


class FrameBuffer:
    """Bounded FIFO of 20 ms PCM frames (``bytes``), oldest dropped when full.

    With ``prefill`` > 1 it is a minimal jitter buffer: after start and after
    every underrun it plays nothing until ``prefill`` frames are queued, so a
    producer that delivers in bursts does not cause one gap per burst.
    """

    def __init__(self, depth: int = 6, prefill: int = 1) -> None:
        self._frames: deque[bytes] = deque(maxlen=depth)
        self._depth = depth
        self._prefill = prefill
        self._filling = prefill > 1
        self.pushed = 0
        self.popped = 0
        self.missing = 0
        self.dropped = 0

    def push(self, frame: bytes) -> None:
        if len(self._frames) == self._depth:
            self.dropped += 1
        self._frames.append(frame)
        self.pushed += 1

    def pop(self) -> bytes | None:
        """The oldest frame, or ``None`` when empty (counted as missing once audio has begun)."""
        if self._filling:
            if len(self._frames) < self._prefill:
                if self.popped:
                    self.missing += 1
                return None
            self._filling = False
        try:
            frame = self._frames.popleft()
        except IndexError:
            if self.pushed:
                self.missing += 1
            self._filling = self._prefill > 1
            return None
        self.popped += 1
        return frame

    def __len__(self) -> int:
        return len(self._frames)

    def clear(self) -> None:
        self._frames.clear()

    def stats(self) -> BufferStats:
        return BufferStats(self.pushed, self.popped, self.missing, self.dropped)
