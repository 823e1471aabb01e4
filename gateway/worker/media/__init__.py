"""The pivot PCM format, PyAV resampling, bounded frame buffers, the bridge."""
