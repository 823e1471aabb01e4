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

from gateway.media.buffers import FrameBuffer
from gateway.media.frames import CHANNELS, FRAME_BYTES, PTIME_MS, SAMPLE_RATE, SILENCE


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
    """Pushes SIP audio into ``from_sip`` and plays ``to_sip`` into the call."""

    def __init__(self, from_sip: FrameBuffer, to_sip: FrameBuffer) -> None:
        super().__init__()
        self._from_sip = from_sip
        self._to_sip = to_sip
        self._out = pj.ByteVector(SILENCE)
        self._out_pointer = _data_pointer(self._out)
        self._silence = pj.ByteVector(SILENCE)
        self._fast = read_vector is _fast_read

    def onFrameReceived(self, frame: Any) -> None:
        if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO:
            self._from_sip.push(read_vector(frame.buf))

    def onFrameRequested(self, frame: Any) -> None:
        data = self._to_sip.pop()
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.size = FRAME_BYTES
        if data is None:
            frame.buf = self._silence
        elif self._fast and len(data) == FRAME_BYTES:
            ctypes.memmove(self._out_pointer, data, FRAME_BYTES)
            frame.buf = self._out
        else:  # pragma: no cover - fallback runtimes
            frame.buf = pj.ByteVector(data)
