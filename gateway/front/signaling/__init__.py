"""WebSocket signaling: the wire schema and one session per connection."""
