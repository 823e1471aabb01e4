"""The WebRTC leg: aiortc peer connection and the paced outgoing track."""
