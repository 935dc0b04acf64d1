"""Plain-Zenoh helpers for the tests: sessions on loopback only, with multicast scouting off so
nothing a test does reaches the network."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence

import zenoh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def loopback_config(mode: str = "peer", *, listen: Sequence[str] = (), connect: Sequence[str] = ()) -> zenoh.Config:
    config = zenoh.Config()
    config.insert_json5("mode", json.dumps(mode))
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("listen/endpoints", json.dumps(list(listen)))
    config.insert_json5("connect/endpoints", json.dumps(list(connect)))
    return config


def open_pair() -> tuple[zenoh.Session, zenoh.Session]:
    """Two connected sessions: one listening on a loopback port, one connected to it."""
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    listener = zenoh.open(loopback_config(listen=[endpoint]))
    return listener, zenoh.open(loopback_config(connect=[endpoint]))
