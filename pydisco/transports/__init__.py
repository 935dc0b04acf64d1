"""Cloud transports: the registry of URL schemes.

A transport is found by its URL scheme in the ``pydisco.transports`` entry-point group, so a
third-party package can add one. The built-in ones (``ws``, ``wss``, ``quic``, ``memory``) are
modules of this package, found here even when no entry points are installed (a checkout run
without ``pip install``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import ssl
from urllib.parse import urlsplit

import trio

from ._base import (
    DEFAULT_MAX_FRAME_SIZE,
    BatchingConnection,
    ConnectionHandler,
    FrameConnection,
    FrameTooLarge,
    ListenerInfo,
    Transport,
    remote_host,
    send_frames,
    set_remote_host,
)

ENTRY_POINT_GROUP = "pydisco.transports"

_BUILTIN: dict[str, str] = {"ws": "websocket", "wss": "websocket", "quic": "quic", "memory": "memory"}
_cache: dict[str, Transport] = {}


class UnknownTransportError(LookupError):
    """No transport is registered for a URL scheme (or the registered one failed to load)."""


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_schemes() -> tuple[str, ...]:
    """Every scheme registered (entry points and built-ins), whether or not it loads here."""
    return tuple(sorted(set(_BUILTIN) | set(_entry_points())))


def get_transport(scheme: str) -> Transport:
    """The transport registered for ``scheme``; :class:`UnknownTransportError` if none loads."""
    scheme = scheme.lower()
    cached = _cache.get(scheme)
    if cached is not None:
        return cached
    ep = _entry_points().get(scheme)
    try:
        if ep is not None:
            found: Transport = ep.load()
        elif scheme in _BUILTIN:
            found = importlib.import_module(f".{_BUILTIN[scheme]}", __name__).transport
        else:
            raise UnknownTransportError(
                f"no transport for the URL scheme {scheme!r}; known schemes: {', '.join(known_schemes())}"
            )
    except (ImportError, AttributeError) as e:
        raise UnknownTransportError(f"the transport for {scheme!r} is registered but does not load: {e}") from e
    if scheme not in getattr(found, "schemes", ()):
        raise UnknownTransportError(f"the transport registered for {scheme!r} does not declare that scheme")
    _cache[scheme] = found
    return found


def available_schemes() -> tuple[str, ...]:
    """The registered schemes whose transport actually loads in this environment."""
    usable = []
    for scheme in known_schemes():
        try:
            get_transport(scheme)
        except UnknownTransportError:
            continue
        usable.append(scheme)
    return tuple(usable)


def split_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a transport URL; ValueError if it has no scheme or host."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        raise ValueError(f"a transport URL looks like scheme://host:port, got {url!r}")
    try:
        port = parts.port or 0
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}: {e}") from None
    return parts.scheme.lower(), parts.hostname, port


async def connect(
    url: str, *, ssl_context: ssl.SSLContext | None = None, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> FrameConnection:
    """Open a client connection to ``url`` with the transport its scheme names."""
    scheme, _, _ = split_url(url)
    return await get_transport(scheme).connect(url, ssl_context=ssl_context, max_frame_size=max_frame_size)


async def serve(
    handler: ConnectionHandler,
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[ListenerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``url`` (port 0 picks a free port) until cancelled; reports a ListenerInfo.
    ``reuse_port``: share the port with other processes (SO_REUSEPORT; ``ws``, ``wss`` and
    ``quic``); a scheme whose transport cannot raises UnknownTransportError."""
    scheme, host, port = split_url(url)
    transport = get_transport(scheme)
    if reuse_port:
        if scheme not in REUSE_PORT_SCHEMES:
            raise UnknownTransportError(f"the {scheme!r} transport cannot share its port with other processes")
        await transport.serve(handler, host, port, ssl_context=ssl_context, max_frame_size=max_frame_size,
                              task_status=task_status, reuse_port=True)  # type: ignore[call-arg]  # fmt: skip
        return
    await transport.serve(
        handler, host, port, ssl_context=ssl_context, max_frame_size=max_frame_size, task_status=task_status
    )


REUSE_PORT_SCHEMES = frozenset({"ws", "wss", "quic"})
"""Built-in schemes whose listeners can share a port between processes (``reuse_port``)."""


__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "BatchingConnection",
    "ENTRY_POINT_GROUP",
    "ConnectionHandler",
    "FrameConnection",
    "FrameTooLarge",
    "ListenerInfo",
    "REUSE_PORT_SCHEMES",
    "Transport",
    "UnknownTransportError",
    "available_schemes",
    "connect",
    "get_transport",
    "known_schemes",
    "remote_host",
    "send_frames",
    "serve",
    "set_remote_host",
    "split_url",
]
