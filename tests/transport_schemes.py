"""The transport schemes the server tests run over (a new transport adds its scheme here)."""

SCHEMES = ["memory", "ws", "wss", "quic", "zenoh"]
