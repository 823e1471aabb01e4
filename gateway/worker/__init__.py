"""A worker process: pjsua2, aiortc and the media bridges of its calls."""
