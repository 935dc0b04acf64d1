"""One QUIC connection carrying frames: drives aioquic's sans-IO ``QuicConnection``.

The endpoint (client or server, in ``quic.py``) owns the UDP socket, a non-blocking one, and
the task that reads it. Everything that touches ``QuicConnection`` is synchronous, so it runs in
whichever task has something to do, and a frame meets no task switch inside the transport other
than the hand-over to the task calling ``receive_frame``:

* The endpoint's reader drains the socket in bursts. It queues each datagram on its connection
  (``datagram_received``), then has each connection take its burst in (``datagrams_arrived``):
  feed QUIC, hand the decoded frames to the receiving channel, and, when that input may call
  for sending at once (``_output_due``: the handshake, a full congestion window, a stream
  waiting to be freed), send what QUIC wants to send; otherwise QUIC's acknowledgement timer
  (``QuicSettings.ack_delay``) does.
* Application tasks calling the ``FrameConnection`` methods hand data to QUIC, packetise it at
  once (so frames leave in call order) and send the datagrams themselves; ``send_frames``
  hands several frames over before packetising, so they share packets.
* The driver task, ``run()``, does what nobody else will: QUIC's timers (delayed
  acknowledgements, loss recovery, the idle timeout), intake that waited for room in the
  channel, and sending once the socket would block. Whoever changes QUIC's state moves the
  driver's sleep deadline to QUIC's next timer rather than waking it.

Datagrams leave in the order QUIC made them: all go through one outbox, sent at once while the
socket takes them; when it would block, the rest wait, in order, for the driver.

Backpressure, both ways:

* Receiving: decoded frames wait in a bounded channel (``QuicSettings.frame_queue``). While it
  is full, and only then, datagrams stay queued, untaken; the endpoint drops further datagrams
  for this connection (a bounded inbox), which QUIC's loss recovery treats as loss, so the peer
  backs off. Timers still run, so acknowledgements and retransmissions of our own data continue.
  ``receive_frame`` wakes the driver as it makes room.
* Sending: ``send_frame`` waits while more than ``QuicSettings.send_buffer`` bytes are
  unacknowledged.

Time is ``trio.current_time()`` everywhere, so the connection runs under a ``MockClock``.
"""

from __future__ import annotations

import collections
import logging
import math
import ssl
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import trio
from aioquic.quic import events
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicErrorCode

from ._base import FrameTooLarge
from ._quic_config import QuicSettings
from ._quic_framing import (
    MAX_VARINT,
    FrameDecoder,
    Oversized,
    StreamHeader,
    StreamTable,
    encode_frame,
    encode_stream_header,
)

logger = logging.getLogger(__name__)

INBOX_DATAGRAMS = 256
"""Datagrams queued for one connection before the endpoint drops more (UDP semantics)."""

STREAM_CREDIT = 128
"""Streams an aioquic peer lets this side have open at once; it grants one more for each
stream ended both ways (FIN or reset in each direction)."""

LINGER_MAX = 5.0
"""Longest ``aclose`` waits for sent data to be acknowledged (capped by the idle timeout)."""


class DatagramSocket(Protocol):
    """The endpoint's UDP socket, as a connection sends on it."""

    def send_nowait(self, data: bytes, addr: NetworkAddress) -> bool:
        """Send one datagram now; False, with nothing sent, if the socket would block. Errors
        are the endpoint's to handle (a client's connection fails, a server ignores them)."""
        ...

    async def wait_writable(self) -> None:
        """Wait until the socket may take a datagram again."""
        ...


_Item = tuple[int, bytes] | FrameTooLarge

# bad_certificate, unsupported_certificate, certificate_revoked, _expired, _unknown, unknown_ca
_CERTIFICATE_ALERTS = frozenset({42, 43, 44, 45, 46, 48})


def _unacked_bytes(quic: QuicConnection) -> int:
    # aioquic reports no acknowledgements; each stream sender keeps its bytes from the first
    # unacknowledged one (_buffer_start) to the end of what was written (_buffer_stop). aioquic
    # internals (checked against 1.7), like the ack delay, the congestion window and the stream
    # credit below; the backpressure, close and credit tests catch a change.
    return sum(s.sender._buffer_stop - s.sender._buffer_start for s in quic._streams.values())


def _stream_credit_pending(quic: QuicConnection) -> bool:
    # aioquic frees a stream ended both ways while packetising, after it has written that
    # round's MAX_STREAMS: the new credit waits for the next packetising, which input used to
    # trigger and now need not (``_output_due``). Its own rule for when a grant is worth
    # sending is kept (aioquic internals again, checked against 1.7; the credit test catches
    # a change).
    limit = quic._local_max_streams_bidi
    return limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent


def _tls_alert(event: events.ConnectionTerminated) -> int | None:
    """The TLS alert that ended the connection (QUIC carries it as CRYPTO_ERROR + alert)."""
    alert = event.error_code - QuicErrorCode.CRYPTO_ERROR
    return alert if 0 <= alert < 256 else None


def _tls_error(event: events.ConnectionTerminated) -> ssl.SSLError:
    if _tls_alert(event) in _CERTIFICATE_ALERTS:
        return ssl.SSLCertVerificationError(event.reason_phrase)
    return ssl.SSLError(event.reason_phrase)


def _check_stream_id(stream_id: int) -> None:
    if not 0 <= stream_id <= MAX_VARINT:
        raise ValueError(f"stream ids are integers in [0, 2**62), got {stream_id!r}")


def _describe_end(event: events.ConnectionTerminated) -> str:
    alert = _tls_alert(event)
    if alert is not None:
        return f"TLS handshake failed: {event.reason_phrase or 'no reason given'} (alert {alert})"
    reason = event.reason_phrase or "no reason given"
    if reason == "Idle timeout":
        return "no packet from the peer within the idle timeout"
    return f"connection closed with error 0x{event.error_code:x}: {reason}"


class QuicFrameConnection:
    """Frames on numbered streams over one QUIC connection (meets ``FrameConnection``).

    Made by ``pydisco.transports.quic``; see ``transports._base`` for the contract.
    """

    def __init__(
        self,
        quic: QuicConnection,
        socket: DatagramSocket,
        *,
        settings: QuicSettings,
        max_frame_size: int,
        peer: str,
        on_cid_issued: Callable[[bytes], None] | None = None,
        on_cid_retired: Callable[[bytes], None] | None = None,
    ) -> None:
        self._quic = quic
        self._socket = socket
        self._settings = settings
        self._max_frame_size = max_frame_size
        self._peer = peer
        self._on_cid_issued = on_cid_issued
        self._on_cid_retired = on_cid_retired
        self._is_client = quic.configuration.is_client
        self._inbox: collections.deque[tuple[bytes, NetworkAddress]] = collections.deque()
        self._ready: collections.deque[_Item] = collections.deque()
        self._outbox: collections.deque[tuple[bytes, NetworkAddress]] = collections.deque()
        self._frames_send, self._frames_recv = trio.open_memory_channel[_Item](
            settings.frame_queue
        )
        self._decoders: dict[int, FrameDecoder] = {}
        self._streams = StreamTable()
        self._credit_warned = False
        self._wakeup = trio.Event()
        self._sleep: trio.CancelScope | None = None  # the driver's, while it waits
        self._deadline = math.inf  # QUIC's next timer, as last computed
        self._send_blocked = False  # the socket would block: the driver sends the outbox
        self._stopped = False  # run() has ended: the socket may be gone
        self._progress = trio.lowlevel.ParkingLot()  # senders waiting for acknowledgements
        self._handshake_done = trio.Event()
        self._control_opened = trio.Event()  # server: the client opened stream 0 (or never will)
        self._handshake_ok = False
        self._ended: events.ConnectionTerminated | None = None
        self._failure: str | None = None  # the socket failed (e.g. ICMP port unreachable)
        self._closing = False  # aclose() was called
        self._cwnd_full = False  # the congestion window held data back at the last packetising
        self._datagram_size = settings.max_datagram_size
        quic._ack_delay = settings.ack_delay  # aioquic's own is 1 ms (see QuicSettings.ack_delay)

    # ----- endpoint side -------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        """Queue a datagram from the peer (dropped when the inbox is full); call
        ``datagrams_arrived`` after the last one of a burst."""
        if len(self._inbox) < INBOX_DATAGRAMS:
            self._inbox.append((data, addr))

    def datagrams_arrived(self) -> None:
        """Take in the queued datagrams now (unless the channel is full), handing their frames
        to the channel, and send what they call for. Never blocks."""
        if not self._stopped:
            self._service()

    def transport_failed(self, reason: str) -> None:
        """The socket cannot reach the peer any more; ends the connection as broken."""
        if self._failure is None:
            self._failure = reason
        self._wake()

    async def run(self) -> None:
        """The driver: runs until the QUIC connection has ended (or the socket failed), then
        hands the last decoded frames to the reader before ending the frame channel.

        On cancellation it sends the peer a CONNECTION_CLOSE (best effort), drops undelivered
        frames and returns.
        """
        try:
            await self._drive()
        except BaseException:
            self._frames_send.close()
            raise
        finally:
            self._stopped = True
            self._sleep = None
            self._abort_on_exit()
            self._handshake_done.set()
            self._control_opened.set()
            self._progress.unpark_all()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 0.1):
                await self._send_last()
        await self._flush_ready_then_end()

    async def wait_connected(self) -> None:
        """Client: wait for the handshake, then open the control stream.

        Raises ``trio.BrokenResourceError`` saying why (e.g. certificate refused) on failure.
        """
        await self._handshake_done.wait()
        if not self._handshake_ok:
            raise self._broken()
        self._open_stream(0)  # QUIC stream 0, so the server can answer on it
        self._output()

    async def wait_handshake(self) -> bool:
        """Server: wait for the TLS handshake; False if it failed or the connection ended.

        The control stream need not be open yet (a send on it waits until it is): whatever
        deadline the handler keeps for it (the cloud server's ``handshake_timeout``) starts
        then."""
        await self._handshake_done.wait()
        return self._handshake_ok and not self._gone()

    def abort(self, reason: str) -> None:
        """Close now with an error code (the peer sees a broken connection)."""
        self._closing = True
        self._frames_recv.close()
        self._control_opened.set()  # a sender waiting for stream 0 re-checks and raises
        self._quic.close(error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase=reason)
        self._output()

    # ----- FrameConnection -----------------------------------------------------------------

    async def send_frame(self, stream_id: int, frame: bytes) -> None:
        """Queue one frame on ``stream_id`` for sending.

        Waits while too much sent data is unacknowledged, and on a server, for stream 0, until
        the client has opened it (the handler starts before). Cancellation while waiting leaves
        the frame unsent; once queued, the whole frame is sent. Raises ``ClosedResourceError``
        when this side closed the connection or can no longer send on the stream (it ended it,
        or the client has not opened it), ``BrokenResourceError`` when the connection has ended.
        """
        _check_stream_id(stream_id)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        if stream_id == 0 and not self._is_client:
            await self._control_opened.wait()
            self._check_usable()
        while _unacked_bytes(self._quic) >= self._settings.send_buffer:
            await self._progress.park()
            self._check_usable()
        self._queue_frame(stream_id, frame)
        self._output()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _queue_frame(self, stream_id: int, frame: bytes) -> None:
        """Hand one frame to aioquic on its stream (a client opens it on first use)."""
        quic_id = self._streams.quic_id(stream_id)
        if quic_id is None:
            if not self._is_client:
                raise trio.ClosedResourceError(
                    f"stream {stream_id} is not open: the client opens streams, and this one "
                    "was never opened or has ended both ways"
                )
            quic_id = self._open_stream(stream_id)
        try:
            self._quic.send_stream_data(quic_id, encode_frame(frame))
        except (ValueError, RuntimeError) as exc:  # aioquic: ended by us, or reset on request
            raise trio.ClosedResourceError(f"cannot send on stream {stream_id}: {exc}") from exc

    async def send_frames(self, frames: Sequence[tuple[int, bytes]], end: Collection[int] = ()) -> None:
        """Queue several frames, then end the streams in ``end``, and packetise them together:
        frames ready at once share packets (and datagrams) instead of one each. Waits and
        raises like ``send_frame`` (the send buffer is checked once, before the batch)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        if not self._is_client and any(sid == 0 for sid, _ in frames):
            await self._control_opened.wait()
            self._check_usable()
        while _unacked_bytes(self._quic) >= self._settings.send_buffer:
            await self._progress.park()
            self._check_usable()
        try:
            for stream_id, frame in frames:
                _check_stream_id(stream_id)
                self._queue_frame(stream_id, frame)
            for stream_id in end:
                quic_id = self._streams.quic_id(stream_id)
                if quic_id is not None:
                    try:
                        self._quic.send_stream_data(quic_id, b"", end_stream=True)
                    except (ValueError, RuntimeError):
                        pass  # already ended, or reset at the peer's request
                    self._streams.sent_fin(quic_id)
        finally:
            self._output()  # whatever was queued leaves, in order, even if a later frame failed
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_frame(self) -> tuple[int, bytes]:
        """The next frame from the peer, as ``(stream_id, frame)``, in order per stream.

        Raises ``FrameTooLarge`` in place of a frame over ``max_frame_size`` (its body is
        skipped, the connection stays usable), ``EndOfChannel`` after the peer closed cleanly,
        ``BrokenResourceError`` when the connection was lost, ``ClosedResourceError`` when this
        side closed it. Cancellation loses no frame.
        """
        if self._closing:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            item = await self._frames_recv.receive()
        except trio.EndOfChannel:
            if self._clean_end():
                raise
            raise self._broken() from None
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the connection was closed") from None
        if self._ready:
            self._wake()  # the driver held frames back for room in the channel
        if isinstance(item, FrameTooLarge):
            raise item
        return item

    async def end_stream(self, stream_id: int) -> None:
        """Send FIN on ``stream_id``: no more frames follow. Both sides must end a request
        stream for QUIC to free it (a connection has 128 open at a time). A no-op for a stream
        never used or already ended. Does not block; raises like ``send_frame`` when the
        connection is closed or lost."""
        _check_stream_id(stream_id)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        quic_id = self._streams.quic_id(stream_id)
        if quic_id is not None:  # else nothing was ever sent there: nothing to end
            try:
                self._quic.send_stream_data(quic_id, b"", end_stream=True)
            except (ValueError, RuntimeError):
                pass  # already ended, or reset at the peer's request
            self._streams.sent_fin(quic_id)
            self._output()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Close cleanly: wait (up to the idle timeout, at most 5 s) until the peer has
        acknowledged all sent data, then close; the peer then sees ``EndOfChannel``.

        Idempotent. If cancelled, or the wait times out, the connection is still closed, with
        an error code (the peer sees a broken connection). Tasks blocked in ``receive_frame``
        get ``ClosedResourceError``.
        """
        if self._closing:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        self._frames_recv.close()
        self._control_opened.set()
        self._progress.unpark_all()  # blocked senders re-check and raise
        clean = False
        try:
            linger = min(LINGER_MAX, self._settings.idle_timeout)
            with trio.move_on_after(linger):
                while not self._gone() and _unacked_bytes(self._quic) > 0:
                    await self._progress.park()
                clean = True
        finally:
            if clean:
                self._quic.close(error_code=QuicErrorCode.NO_ERROR)
            else:
                self._quic.close(
                    error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase="closed abruptly"
                )
            self._output()
        await trio.lowlevel.checkpoint()

    # ----- driver ---------------------------------------------------------------------------

    async def _drive(self) -> None:
        self._output()  # a client's first flight
        while not self._gone():
            self._wakeup = trio.Event()  # first, so no wake-up during this round is lost
            self._service()
            if self._gone():
                break
            self._sleep = trio.CancelScope(deadline=self._deadline)  # QUIC's next timer
            with self._sleep:
                if self._send_blocked:
                    await self._socket.wait_writable()
                    self._send_blocked = False
                else:
                    await self._wakeup.wait()
            self._sleep = None

    def _service(self) -> None:
        # Everything that is due: queued datagrams, QUIC's timer, frames for the channel, and
        # the datagrams all that calls for.
        now = trio.current_time()
        fed = self._take_in(now)
        # Every other change of QUIC's state is followed by _retime(), which keeps the deadline.
        timer = self._quic.get_timer() if fed else self._deadline
        fired = timer is not None and now >= timer
        if fired:
            self._quic.handle_timer(now)
            self._handle_events()
        self._deliver_ready()
        if fired or (fed and self._output_due()):
            self._collect(now)
        self._send_outbox()
        self._progress.unpark_all()
        self._retime()

    def _output_due(self) -> bool:
        """Whether datagrams just taken in may call for sending before QUIC's next timer.

        Asking QUIC what to send walks every open stream, so it is not asked after each burst
        of input once the handshake is done: what input calls for — an acknowledgement, flow
        control credit, a stream's reset — waits for the acknowledgement timer, which every
        ack-eliciting packet sets (within ``QuicSettings.ack_delay``), and QUIC's pacing sets
        a timer of its own. Only data held back by a full congestion window is sent as soon
        as an acknowledgement makes room (``_cwnd_full``), and streams are freed as soon as
        the acknowledgement of their end arrives. The first change of aioquic
        internals this relies on shows in the transport tests (backpressure, flow, close)."""
        if not self._handshake_ok or self._cwnd_full or self._gone() or self._closing:
            return True
        # A stream this side has ended both ways but aioquic still holds waits for the
        # acknowledgement of our FIN; aioquic frees it (and grants the peer a new one) only
        # while packetising, so an acknowledgement is worth a packetising then.
        return len(self._quic._streams) > len(self._streams)

    def _take_in(self, now: float) -> bool:
        """Feed QUIC every queued datagram, handing the frames they carry to the channel as
        they come; True if any was fed.

        Leaves datagrams queued only while the channel is full (frames are left in ``_ready``);
        ``receive_frame`` then wakes the driver as it makes room. Stopping for any other reason
        would strand them: their wake-ups are spent, and nothing else comes until the peer, its
        packets unacknowledged, retransmits after a probe timeout that doubles each time.
        """
        fed = False
        while self._inbox:
            self._deliver_ready()
            if self._ready:
                break
            data, addr = self._inbox.popleft()
            self._quic.receive_datagram(data, addr, now)
            self._handle_events()
            fed = True
        return fed

    def _handle_events(self) -> None:
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                self._decoders.pop(event.stream_id, None)
                self._streams.received_fin(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                self._streams.sent_fin(event.stream_id)  # aioquic resets our side
            elif isinstance(event, events.HandshakeCompleted):
                self._handshake_ok = True
                self._handshake_done.set()
            elif isinstance(event, events.ConnectionIdIssued):
                if self._on_cid_issued is not None:
                    self._on_cid_issued(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                if self._on_cid_retired is not None:
                    self._on_cid_retired(event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                self._ended = event
                self._handshake_done.set()
                self._control_opened.set()

    def _stream_data(self, quic_id: int, data: bytes, fin: bool) -> None:
        if quic_id % 4 != 0:
            return  # not a client-initiated bidirectional stream: never used here, ignore it
        decoder = self._decoders.get(quic_id)
        if decoder is None:
            decoder = FrameDecoder(self._max_frame_size, stream_header=not self._is_client)
            self._decoders[quic_id] = decoder
        for piece in decoder.feed(data):
            if isinstance(piece, StreamHeader):
                if (piece.stream_id == 0) != (quic_id == 0):
                    self._protocol_violation(f"QUIC stream {quic_id} claims id {piece.stream_id}")
                    return
                self._streams.bind(piece.stream_id, quic_id)
                if quic_id == 0:
                    self._control_opened.set()
                continue
            stream_id = self._streams.contract_id(quic_id)
            if stream_id is None:
                continue  # a stream this side has forgotten (ended both ways): drop
            if isinstance(piece, Oversized):
                self._ready.append(
                    FrameTooLarge(
                        f"a {piece.size}-byte frame on stream {stream_id} exceeds the limit of "
                        f"{self._max_frame_size} bytes"
                    )
                )
            else:
                self._ready.append((stream_id, piece))
        if fin:
            if decoder.mid_frame:
                logger.warning("%s: QUIC stream %d ended inside a frame", self._peer, quic_id)
            del self._decoders[quic_id]
            self._streams.received_fin(quic_id)

    def _open_stream(self, stream_id: int) -> int:
        # Client only: the next QUIC stream, announced by its header.
        if len(self._streams) >= STREAM_CREDIT and not self._credit_warned:
            self._credit_warned = True  # once: it is the caller's pattern, not a transient
            logger.warning(
                "%s: %d streams are open and not ended both ways; QUIC holds new ones back "
                "until the peer frees one, so frames on stream %d wait. End finished streams "
                "on both sides with end_stream().", self._peer, len(self._streams), stream_id
            )
        quic_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(quic_id, encode_stream_header(stream_id))
        self._streams.bind(stream_id, quic_id)
        return quic_id

    def _protocol_violation(self, reason: str) -> None:
        logger.warning("%s: %s", self._peer, reason)
        self._quic.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION, reason_phrase=reason)

    def _deliver_ready(self) -> None:
        while self._ready:
            try:
                self._frames_send.send_nowait(self._ready[0])
            except trio.WouldBlock:
                return
            except trio.BrokenResourceError:  # closed locally: nobody will read
                self._ready.clear()
                return
            self._ready.popleft()

    def _output(self) -> None:
        # Packetise at once, in call order, so frames leave in the order they were sent: QUIC
        # orders frames within a stream only, and across streams this then still holds unless
        # packets are lost or the congestion window is full.
        if self._stopped:
            return  # the socket may be closed; run() sent the last datagrams
        self._collect(trio.current_time())
        self._send_outbox()
        self._retime()

    def _collect(self, now: float) -> None:
        # A server connection has no path to send on before its first datagram is taken in.
        if self._quic.get_peer_address() is not None:
            self._outbox.extend(self._quic.datagrams_to_send(now=now))
            if _stream_credit_pending(self._quic):  # streams freed just now: grant them at once
                self._outbox.extend(self._quic.datagrams_to_send(now=now))
            # Full (or nearly): what is still unsent waits for an acknowledgement to make room.
            loss = self._quic._loss
            self._cwnd_full = loss.bytes_in_flight + self._datagram_size > loss.congestion_window

    def _send_outbox(self) -> None:
        while self._outbox and not self._send_blocked:
            data, addr = self._outbox[0]
            if not self._socket.send_nowait(data, addr):
                self._send_blocked = True
                self._wake()  # the driver waits until the socket takes more
                return
            self._outbox.popleft()

    def _retime(self) -> None:
        # QUIC's next timer moves with every change of its state; the driver sleeps until it.
        timer = self._quic.get_timer()
        deadline = math.inf if timer is None else timer
        if deadline != self._deadline:  # moving a Trio deadline costs more than comparing
            self._deadline = deadline
            if self._sleep is not None:
                self._sleep.deadline = deadline
        if self._gone():
            self._wake()

    async def _send_last(self) -> None:
        # The CONNECTION_CLOSE (and anything else QUIC has), waiting for the socket if need be.
        self._collect(trio.current_time())
        while True:
            self._send_blocked = False
            self._send_outbox()
            if not self._outbox:
                return
            await self._socket.wait_writable()

    def _abort_on_exit(self) -> None:
        # Leaving run() early (cancelled, or the endpoint shut down) while QUIC still lives:
        # tell the peer at once rather than let it wait for the idle timeout.
        if self._ended is None and self._failure is None:
            self._quic.close(error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase="shut down")
            self._failure = "the connection was shut down locally"

    async def _flush_ready_then_end(self) -> None:
        # Frames decoded before the end are still delivered, then the channel ends.
        try:
            while self._ready:
                await self._frames_send.send(self._ready.popleft())
        except trio.BrokenResourceError:
            pass
        finally:
            self._frames_send.close()

    # ----- helpers --------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _gone(self) -> bool:
        return self._ended is not None or self._failure is not None

    def _clean_end(self) -> bool:
        return (
            self._failure is None
            and self._ended is not None
            and self._ended.error_code == QuicErrorCode.NO_ERROR
            and self._ended.reason_phrase != "Idle timeout"
        )

    def _check_usable(self) -> None:
        if self._closing:
            raise trio.ClosedResourceError("the connection was closed")
        if self._gone():
            raise self._broken()

    def _broken(self) -> trio.BrokenResourceError:
        if self._failure is not None:
            reason = self._failure
        elif self._ended is not None:
            if self._clean_end():
                reason = "the peer closed the connection"
            else:
                reason = _describe_end(self._ended)
        else:
            reason = "the connection ended"
        error = trio.BrokenResourceError(f"QUIC connection with {self._peer}: {reason}")
        if self._ended is not None and _tls_alert(self._ended) is not None:
            error.__cause__ = _tls_error(self._ended)
        return error
