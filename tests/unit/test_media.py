"""The pivot format: resampling browser audio and the bounded frame buffer."""

from __future__ import annotations

import fractions

import av
import numpy as np
from peers.webclient import dominant_frequency

from gateway.worker.media.buffers import FrameBuffer
from gateway.worker.media.frames import FRAME_BYTES, SAMPLE_RATE


def opus_like_frames(hz: float, count: int):
    """48 kHz stereo s16 frames of 20 ms, as aiortc's Opus decoder makes them."""
    for i in range(count):
        t = (np.arange(960) + i * 960) / 48000
        mono = (np.sin(2 * np.pi * hz * t) * 12000).astype("<i2")
        frame = av.AudioFrame.from_ndarray(
            np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48000
        frame.pts = i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        yield frame


def test_resampler_cuts_exact_20ms_pivot_frames():
    from gateway.worker.media.transcode import PivotResampler

    resampler = PivotResampler()
    out = [chunk for frame in opus_like_frames(1000, 50) for chunk in resampler.feed(frame)]
    # 1 s in; the resampler holds back a few ms of latency, so at least 49 frames out.
    assert 49 <= len(out) <= 50
    assert {len(chunk) for chunk in out} == {FRAME_BYTES}
    tone = dominant_frequency(np.frombuffer(b"".join(out[5:]), "<i2"), SAMPLE_RATE)
    assert abs(tone.hz - 1000) < 5


def test_buffer_drops_oldest_and_counts():
    buffer = FrameBuffer(depth=3)
    assert buffer.pop() is None
    assert buffer.missing == 0  # nothing has flowed yet: not an underrun
    for i in range(5):
        buffer.push(bytes([i]))
    assert buffer.dropped == 2
    assert [buffer.pop(), buffer.pop(), buffer.pop()] == [b"\x02", b"\x03", b"\x04"]
    assert buffer.pop() is None
    assert buffer.stats().missing == 1


def test_media_port_reads_vectors_exactly():
    """The ctypes fast path must return the same bytes as SWIG's own copy."""
    import pjsua2 as pj

    from gateway.worker.sip.media_port import _fast_read, read_vector

    data = bytes(range(256)) * 2 + bytes(128)
    vector = pj.ByteVector(data)
    assert read_vector is _fast_read
    assert read_vector(vector) == bytes(vector) == data


def test_prefill_waits_for_frames_after_start_and_after_underrun():
    buffer = FrameBuffer(depth=6, prefill=2)
    buffer.push(b"a")
    assert buffer.pop() is None  # one frame is not enough to start
    buffer.push(b"b")
    assert [buffer.pop(), buffer.pop()] == [b"a", b"b"]
    assert buffer.pop() is None  # underrun: counted, and prefill re-arms
    buffer.push(b"c")
    assert buffer.pop() is None
    buffer.push(b"d")
    assert buffer.pop() == b"c"
    assert buffer.missing == 2
