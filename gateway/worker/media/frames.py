"""The pivot audio format that crosses between the WebRTC leg and the SIP leg.

Both legs meet at 16 kHz mono signed 16-bit PCM in 20 ms frames: pjmedia's
conference bridge runs at 16 kHz (it converts to PCMU/PCMA/G722 itself), and
aiortc's encoders resample whatever they are given to 48 kHz (Opus) or 8 kHz
(PCMU/PCMA) with PyAV. Browser audio is brought to this format with PyAV's
``AudioResampler`` in :mod:`gateway.worker.media.transcode`.
"""

from fractions import Fraction

SAMPLE_RATE = 16000
CHANNELS = 1
SAMPLE_WIDTH = 2  # bytes, signed little-endian
PTIME_MS = 20
SAMPLES_PER_FRAME = SAMPLE_RATE * PTIME_MS // 1000  # 320
FRAME_BYTES = SAMPLES_PER_FRAME * CHANNELS * SAMPLE_WIDTH  # 640
TIME_BASE = Fraction(1, SAMPLE_RATE)
SILENCE = bytes(FRAME_BYTES)
