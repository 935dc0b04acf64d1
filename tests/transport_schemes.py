"""The transport schemes the server tests run over (the QUIC transport adds "quic" here)."""

SCHEMES = ["memory", "ws", "wss", "quic"]
