"""The pjmedia port that joins a SIP call to the media bridge.

``onFrameReceived`` / ``onFrameRequested`` run on pjmedia's clock thread every
20 ms with a hard deadline, so they do constant work: one ``deque`` operation
and one copy. pjsua2's SWIG ``ByteVector`` copies element by element when
converted with ``bytes()`` (~600 us a frame), so the frame's storage is read and
written through its ``std::vector`` data pointer with ``ctypes`` (~2 us).
"""

from __future__ import annotations

import ctypes
from typing import Any

import pjsua2 as pj

from gateway.worker.media.buffers import FrameBuffer
from gateway.worker.media.frames import CHANNELS, FRAME_BYTES, PTIME_MS, SAMPLE_RATE, SILENCE


def _data_pointer(vector: Any) -> int:
    """Address of a ``std::vector<unsigned char>``'s storage (libstdc++: first member)."""
    pointer = ctypes.c_void_p.from_address(int(vector.this)).value
    return int(pointer or 0)


def _fast_read(vector: Any) -> bytes:
    return ctypes.string_at(_data_pointer(vector), vector.size())


def _slow_read(vector: Any) -> bytes:
    return bytes(vector)


def _choose_reader() -> Any:
    """Use the pointer read only if it gives the same bytes as SWIG's own copy."""
    probe = bytes(range(256))
    try:
        if _fast_read(pj.ByteVector(probe)) == probe:
            return _fast_read
    except (ValueError, TypeError, OSError):  # pragma: no cover - other C++ runtimes
        pass
    return _slow_read  # pragma: no cover


read_vector = _choose_reader()


def audio_format() -> Any:
    """The pivot format as a pjmedia ``MediaFormatAudio``."""
    fmt = pj.MediaFormatAudio()
    fmt.init(pj.PJMEDIA_FORMAT_PCM, SAMPLE_RATE, CHANNELS, PTIME_MS * 1000, 16)
    return fmt


class BridgePort(pj.AudioMediaPort):  # type: ignore[misc]
    """Pushes SIP audio into ``from_sip`` and plays ``to_sip`` into the call.

    Ports are created once per process and reused call after call (see
    :class:`PortPool`): a call attaches its buffers, and detaches them when it
    ends. Detached, the port plays silence and drops what it receives.
    """

    def __init__(self) -> None:
        super().__init__()
        self._from_sip: FrameBuffer | None = None
        self._to_sip: FrameBuffer | None = None
        self._out = pj.ByteVector(SILENCE)
        self._out_pointer = _data_pointer(self._out)
        self._silence = pj.ByteVector(SILENCE)
        self._fast = read_vector is _fast_read

    def attach(self, from_sip: FrameBuffer, to_sip: FrameBuffer) -> None:
        self._from_sip, self._to_sip = from_sip, to_sip

    def detach(self) -> None:
        self._from_sip = self._to_sip = None

    def onFrameReceived(self, frame: Any) -> None:
        sink = self._from_sip  # one read: detach() may run on the SIP thread meanwhile
        if sink is not None and frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO:
            sink.push(read_vector(frame.buf))

    def onFrameRequested(self, frame: Any) -> None:
        source = self._to_sip
        data = source.pop() if source is not None else None
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.size = FRAME_BYTES
        if data is None:
            frame.buf = self._silence
        elif self._fast and len(data) == FRAME_BYTES:
            ctypes.memmove(self._out_pointer, data, FRAME_BYTES)
            frame.buf = self._out
        else:  # pragma: no cover - fallback runtimes
            frame.buf = pj.ByteVector(data)


class PortPool:
    """One :class:`BridgePort` per call slot, for the life of the Endpoint.

    Since pjproject 2.14 the conference bridge adds, removes and disconnects
    ports asynchronously, on its clock thread, while ``~AudioMediaPort`` frees
    the port's memory at once. Destroying a port per call is therefore a
    use-after-free race with the clock thread (seen as a worker SIGSEGV when
    calls were hung up right after set-up). Ports are made at start-up and
    destroyed only at shutdown, once nothing transmits to or from them.
    """

    def __init__(self, size: int) -> None:
        self._free: list[BridgePort] = []
        for i in range(size):
            port = BridgePort()
            port.createPort(f"bridge{i}", audio_format())
            self._free.append(port)
        self._size = size

    def acquire(self, from_sip: FrameBuffer, to_sip: FrameBuffer) -> BridgePort | None:
        if not self._free:
            return None
        port = self._free.pop()
        port.attach(from_sip, to_sip)
        return port

    def release(self, port: BridgePort) -> None:
        port.detach()
        self._free.append(port)

    def close(self) -> None:
        """Drop every port (all must be released and disconnected)."""
        assert len(self._free) == self._size, "ports still in use"
        self._free.clear()
