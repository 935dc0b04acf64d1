"""The QUIC transport (scheme ``quic``): aioquic's sans-IO ``QuicConnection`` over Trio UDP.

``quic://host:port`` — TLS 1.3 always, ALPN ``pydisco/1``. Each of the contract's streams is
its own QUIC stream (see ``_quic_framing``), so a slow request never holds up another one, and
frames are length-prefixed on each stream.

Client::

    conn = await transport.connect("quic://server:4433", ssl_context=ctx)

``ctx`` (an ``ssl.SSLContext``; ``None`` means ``ssl.create_default_context()``) supplies the
trust anchors, verification mode and hostname checking; ``_quic_config`` documents the mapping.

Server::

    # an SSLContext cannot give its key back; this one remembers the PEM it was built from
    ctx = pydisco.cloud.server_ssl_context(Credentials.from_files("cert.pem", "key.pem"))
    await nursery.start(transport.serve, handler, "0.0.0.0", 4433, ssl_context=ctx)

or pass ``settings=QuicSettings(certificate_chain=..., private_key=...)`` to either side, which
also sets the idle timeout and buffer sizes.

Structure: one non-blocking UDP socket per endpoint and a single reader task on it. The reader
drains the socket in bursts, hands each datagram to its connection (the server demultiplexes by
destination connection id), then has each connection it fed take the burst in and answer, in
the reader task itself; senders send their own datagrams. Each connection also has a driver
task for timers and for what had to wait (``_quic_connection``). The server runs a task per
connection that starts the handler once the TLS handshake is done (the handler's own deadline
then covers the control stream) and removes the connection when QUIC has finished closing it.
A client connection's reader and driver run as a Trio *system task*, because ``connect()``
returns a plain connection object rather than a context manager; the task ends when the
connection does (``aclose()``, the peer, or the idle timeout), and when the Trio run ends.
Not implemented: address validation by Retry packets, connection migration on
the client, 0-RTT, client certificates.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import urllib.parse

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from pydisco._errors import ConfigurationError

from ._base import DEFAULT_MAX_FRAME_SIZE, ConnectionHandler, ListenerInfo, set_remote_host
from ._quic_config import QuicSettings as QuicSettings
from ._quic_config import client_configuration, server_configuration
from ._quic_connection import QuicFrameConnection as QuicFrameConnection

logger = logging.getLogger(__name__)

SCHEME = "quic"
MAX_DATAGRAM = 65535
MAX_CONNECTIONS = 4096
"""New connections a server refuses (by ignoring their first packet) beyond this many."""
READ_BURST = 64
"""Datagrams a reader takes from the socket before its connections process them and other tasks
get a turn."""

# The server has nobody to report these to; a client treats them as the peer being gone.
_PEER_GONE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                               errno.ENETUNREACH})


def _parse_url(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != SCHEME or parts.hostname is None or parts.port is None:
        raise ConfigurationError(f"expected quic://host:port, got {url!r}")
    return parts.hostname, parts.port


async def _udp_socket(host: str, port: int, *, passive: bool) -> tuple[socket.socket, NetworkAddress]:
    # A plain non-blocking socket rather than a trio.socket: sending and reading then need no
    # checkpoint per datagram, and Trio only waits for it to become readable or writable.
    flags = trio.socket.AI_PASSIVE if passive else 0
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM, flags=flags)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock, addr


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


class QuicTransport:
    """The ``quic`` scheme's ``Transport``: ``pydisco.transports.quic.transport``."""

    schemes: tuple[str, ...] = (SCHEME,)

    async def connect(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        settings: QuicSettings | None = None,
    ) -> QuicFrameConnection:
        """Open a connection to ``quic://host:port`` and complete the TLS handshake.

        Raises ``trio.BrokenResourceError`` if the server is unreachable or the handshake fails
        (its ``__cause__`` is an ``ssl.SSLCertVerificationError`` when the certificate was
        refused), within the idle timeout at worst. On cancellation the half-open connection is
        abandoned and its task ended.
        """
        settings = settings if settings is not None else QuicSettings()
        host, port = _parse_url(url)
        config = client_configuration(settings, ssl_context, host)
        sock, addr = await _udp_socket(host, port, passive=False)
        try:
            sock.connect(addr)  # connected: ICMP errors surface, strangers are filtered
        except BaseException:
            sock.close()
            raise
        client = _ClientEndpoint(sock, addr, config, settings, max_frame_size, f"{host}:{port}")
        trio.lowlevel.spawn_system_task(client.run, name=f"quic client {host}:{port}")
        try:
            await client.conn.wait_connected()
        except BaseException:
            client.cancel()  # the task closes the socket as it ends
            raise
        return client.conn

    async def serve(
        self,
        handler: ConnectionHandler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        settings: QuicSettings | None = None,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[ListenerInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept QUIC connections on ``host:port`` until cancelled, running ``handler`` for
        each in its own task; reports the bound port through ``task_status``.

        ``reuse_port``: set SO_REUSEPORT so several processes share the port; the kernel
        picks a socket by the datagram's address 4-tuple, so one client's connection stays
        with one process as long as the set of processes does not change (docs/deployment.md).
        There is no ``stop_accepting``: the one socket carries every connection.

        An exception escaping ``handler`` is logged and closes that connection only (the
        client sees ``BrokenResourceError``); when the handler returns, the connection is
        closed cleanly. On cancellation every connection is closed with an error code (the
        clients learn at once, not at their idle timeout) and the socket is closed.
        """
        settings = settings if settings is not None else QuicSettings()
        config = server_configuration(settings, ssl_context)
        sock, addr = await _udp_socket(host, port, passive=True)
        try:
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            bound_port = sock.getsockname()[1]
            async with trio.open_nursery() as nursery:
                server = _ServerEndpoint(sock, config, settings, max_frame_size, handler, nursery)
                task_status.started(ListenerInfo(SCHEME, host, bound_port))
                await server.read_datagrams()
        finally:
            _close(sock)


transport = QuicTransport()


class _ClientEndpoint:
    """A client's connected UDP socket, its reader and its one connection's driver."""

    def __init__(
        self,
        sock: socket.socket,
        addr: NetworkAddress,
        config: QuicConfiguration,
        settings: QuicSettings,
        max_frame_size: int,
        peer: str,
    ) -> None:
        self._sock = sock
        self._addr = addr
        self._scope = trio.CancelScope()
        quic = QuicConnection(configuration=config)
        quic.connect(addr, now=trio.current_time())
        self.conn = QuicFrameConnection(
            quic, self, settings=settings, max_frame_size=max_frame_size, peer=peer
        )

    def cancel(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        # A system task: must never raise (Trio would crash the whole run).
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read)
                    await self.conn.run()
                    nursery.cancel_scope.cancel()
        except Exception:
            logger.exception("QUIC client connection task failed")
        finally:
            _close(self._sock)

    async def _read(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            for _ in range(READ_BURST):
                try:
                    data = self._sock.recv(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self.conn.transport_failed(f"the peer is unreachable ({exc})")
                    return
                self.conn.datagram_received(data, self._addr)
            self.conn.datagrams_arrived()

    # The connection's DatagramSocket:

    def send_nowait(self, data: bytes, addr: NetworkAddress) -> bool:
        try:
            self._sock.send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.conn.transport_failed(f"cannot send to the peer ({exc})")
        return True

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)


class _ServerEndpoint:
    """A server's UDP socket: one reader demultiplexing datagrams to connections by
    destination connection id, and a task per connection."""

    def __init__(
        self,
        sock: socket.socket,
        config: QuicConfiguration,
        settings: QuicSettings,
        max_frame_size: int,
        handler: ConnectionHandler,
        nursery: trio.Nursery,
    ) -> None:
        self._sock = sock
        self._config = config
        self._settings = settings
        self._max_frame_size = max_frame_size
        self._handler = handler
        self._nursery = nursery
        self._by_cid: dict[bytes, QuicFrameConnection] = {}
        self._cids: dict[QuicFrameConnection, set[bytes]] = {}
        self._write_lock = trio.Lock()  # Trio lets only one task wait to write on a socket

    async def read_datagrams(self) -> None:
        fed: dict[QuicFrameConnection, None] = {}  # in order of arrival
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            for _ in range(READ_BURST):
                try:
                    data, addr = self._sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _PEER_GONE_ERRNOS:
                        continue  # some platforms report a past send's ICMP error here
                    raise
                conn = self._dispatch(data, addr)
                if conn is not None:
                    fed[conn] = None
            for conn in fed:
                conn.datagrams_arrived()
            fed.clear()

    def _dispatch(self, data: bytes, addr: NetworkAddress) -> QuicFrameConnection | None:
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._config.connection_id_length
            )
        except ValueError:
            return None  # not QUIC
        known = self._by_cid.get(header.destination_cid)
        if known is not None:
            known.datagram_received(data, addr)
            return known
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self._config.supported_versions
        ):
            self.send_nowait(encode_quic_version_negotiation(
                source_cid=header.destination_cid,
                destination_cid=header.source_cid,
                supported_versions=self._config.supported_versions,
            ), addr)  # fmt: skip
            return None
        # Only a client's first packet (padded to 1200 bytes, RFC 9000 14.1) opens a connection.
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < 1200
            or len(self._cids) >= MAX_CONNECTIONS
        ):
            return None
        quic = QuicConnection(
            configuration=self._config,
            original_destination_connection_id=header.destination_cid,
        )
        conn = QuicFrameConnection(
            quic,
            self,
            settings=self._settings,
            max_frame_size=self._max_frame_size,
            peer=f"{addr[0]}:{addr[1]}",
            on_cid_issued=lambda cid: self._add_cid(conn, cid),
            on_cid_retired=self._remove_cid,
        )
        self._cids[conn] = set()
        self._add_cid(conn, header.destination_cid)
        self._add_cid(conn, quic.host_cid)
        set_remote_host(conn, str(addr[0]))
        conn.datagram_received(data, addr)
        self._nursery.start_soon(self._serve_connection, conn)
        return conn

    def _add_cid(self, conn: QuicFrameConnection, cid: bytes) -> None:
        self._by_cid[cid] = conn
        self._cids[conn].add(cid)

    def _remove_cid(self, cid: bytes) -> None:
        conn = self._by_cid.pop(cid, None)
        if conn is not None:
            self._cids[conn].discard(cid)

    async def _serve_connection(self, conn: QuicFrameConnection) -> None:
        # The handler starts once TLS is done, not once the control stream is open, so that its
        # own deadline covers a client that never opens it (and keeps QUIC alive with PINGs).
        # The driver is shielded while the handler runs: a stopping server's handler still gets
        # its last frames (shutting_down) out before the driver aborts the connection.
        driving = trio.CancelScope(shield=True)

        async def drive() -> None:
            with driving:
                await conn.run()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive)
                try:
                    if await conn.wait_handshake():
                        await self._run_handler(conn)
                finally:
                    driving.shield = False  # an outer cancellation now reaches the driver
        finally:
            for cid in self._cids.pop(conn):
                self._by_cid.pop(cid, None)

    async def _run_handler(self, conn: QuicFrameConnection) -> None:
        try:
            await self._handler(conn)
        except Exception:
            logger.exception("QUIC connection handler failed")
            conn.abort("handler failed")
        else:
            await conn.aclose()

    # The connections' DatagramSocket:

    def send_nowait(self, data: bytes, addr: NetworkAddress) -> bool:
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            return False
        except OSError:
            pass  # UDP: a lost datagram is QUIC's to recover, a gone peer its to time out
        return True

    async def wait_writable(self) -> None:
        async with self._write_lock:
            await trio.lowlevel.wait_writable(self._sock)
