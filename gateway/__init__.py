"""sipgw: a SIP/WebRTC gateway (aiortc + PyAV + pjsua2)."""

__version__ = "0.1.0"
