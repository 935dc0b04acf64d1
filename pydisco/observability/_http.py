"""A tiny HTTP/1.1 responder on Trio for ``/metrics`` and ``/healthz``.

GET (or HEAD) only, one request per connection (``Connection: close``, which every scraper
handles), bounded in size and time, so a stuck or hostile client costs one task for a few
seconds at most. Routes are functions returning ``(status, content type, body)``; they run in
the Trio thread and must not block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import trio

from .._errors import ConfigurationError
from ._logging import get_logger

__all__ = ["HttpListener", "Route", "parse_host_port", "serve_http"]

log = get_logger("pydisco.observability")

Route = Callable[[], tuple[int, str, bytes]]

_MAX_REQUEST = 16 * 1024  # the request line and headers; a scraper sends a few hundred bytes
_REQUEST_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


@dataclasses.dataclass(frozen=True)
class HttpListener:
    """Where the responder listens (the port the OS gave, when asked for 0)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0: any free one)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigurationError(f"expected HOST:PORT such as 127.0.0.1:9100, got {text!r}")
    return host, int(port_text)


async def serve_http(
    host: str,
    port: int,
    routes: Mapping[str, Route],
    *,
    task_status: trio.TaskStatus[HttpListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET ``routes`` (by path) on ``host:port`` until cancelled. Reports the
    :class:`HttpListener` once listening; OSError if the address cannot be bound."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0:  # a name with several addresses would get a different free port on each
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    sockname = listeners[0].socket.getsockname()
    task_status.started(HttpListener(host, int(sockname[1])))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(_REQUEST_TIMEOUT):
                await _respond(stream, routes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)


async def _respond(stream: trio.SocketStream, routes: Mapping[str, Route]) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        if len(request) > _MAX_REQUEST:
            await _send(stream, 400, "text/plain; charset=utf-8", b"request too large\n", head=False)
            return
        data = await stream.receive_some(4096)
        if not data:
            return
        request += data
    line = request.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        await _send(stream, 400, "text/plain; charset=utf-8", b"bad request line\n", head=False)
        return
    method, target, _version = parts
    path = target.split("?", 1)[0]
    route = routes.get(path)
    if method not in ("GET", "HEAD"):
        await _send(stream, 405, "text/plain; charset=utf-8", b"only GET and HEAD\n", head=False, allow=True)
    elif route is None:
        known = ", ".join(sorted(routes))
        await _send(stream, 404, "text/plain; charset=utf-8", f"not found; try {known}\n".encode(), head=method == "HEAD")
    else:
        try:
            status, content_type, body = route()
        except Exception:
            log.exception("the %s route failed", path)
            status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        await _send(stream, status, content_type, body, head=method == "HEAD")


async def _send(stream: trio.SocketStream, status: int, content_type: str, body: bytes, *, head: bool, allow: bool = False) -> None:
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow:
        headers.append("Allow: GET, HEAD")
    await stream.send_all(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
