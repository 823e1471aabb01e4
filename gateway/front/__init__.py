"""The front process: HTTP and WebSocket signaling, sessions, calls, the worker pool.

Nothing in this package imports pjsua2, aiortc or PyAV, even indirectly.
"""
