"""The cloud side: the client (``CloudEndpoint``), the server (``serve``), the wire protocol
(``pydisco.cloud.protocol``, sans-IO; docs/protocol.md), the backends a server generates with,
TLS helpers, and a loopback cloud for tests and the main job.

The server side (``serve``, the backends, the loopback cloud) loads on first use, so a client
does not pay for what only a server needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._client import CloudEndpoint as CloudEndpoint
from ._client import CloudStatistics as CloudStatistics
from ._client import open_cloud_endpoint as open_cloud_endpoint
from ._tls import ALPN as ALPN
from ._tls import LOOPBACK_NAMES as LOOPBACK_NAMES
from ._tls import Credentials as Credentials
from ._tls import client_ssl_context as client_ssl_context
from ._tls import credentials_of as credentials_of
from ._tls import self_signed as self_signed
from ._tls import server_ssl_context as server_ssl_context

if TYPE_CHECKING:
    from ._backends import Backend as Backend
    from ._batched import BatchedBackend as BatchedBackend
    from ._backends import LlamaBackend as LlamaBackend
    from ._backends import OpenAIUpstreamBackend as OpenAIUpstreamBackend
    from ._loopback import LoopbackCloud as LoopbackCloud
    from ._loopback import open_loopback_cloud as open_loopback_cloud
    from ._server import SCHEDULERS as SCHEDULERS
    from ._server import RunningServer as RunningServer
    from ._server import ServerConfig as ServerConfig
    from ._server import ServerStatistics as ServerStatistics
    from ._server import serve as serve

_SERVER_SIDE = {
    "Backend": "._backends",
    "BatchedBackend": "._batched",
    "LlamaBackend": "._backends",
    "OpenAIUpstreamBackend": "._backends",
    "LoopbackCloud": "._loopback",
    "open_loopback_cloud": "._loopback",
    "SCHEDULERS": "._server",
    "RunningServer": "._server",
    "ServerConfig": "._server",
    "ServerStatistics": "._server",
    "serve": "._server",
}

__all__ = [
    "ALPN",
    "LOOPBACK_NAMES",
    "SCHEDULERS",
    "Backend",
    "BatchedBackend",
    "CloudEndpoint",
    "CloudStatistics",
    "Credentials",
    "LlamaBackend",
    "LoopbackCloud",
    "OpenAIUpstreamBackend",
    "RunningServer",
    "ServerConfig",
    "ServerStatistics",
    "client_ssl_context",
    "credentials_of",
    "open_cloud_endpoint",
    "open_loopback_cloud",
    "self_signed",
    "serve",
    "server_ssl_context",
]


def __getattr__(name: str) -> Any:
    module = _SERVER_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'pydisco.cloud' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
