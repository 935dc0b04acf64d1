"""Wire format of the QUIC transport: how a contract stream rides on a QUIC stream, and how
frames are delimited on it. Pure functions and a sans-IO decoder, no I/O.

Streams: every contract stream (0 for connection control, then the client's request ids) is
its own client-initiated bidirectional QUIC stream, opened by the client in order of first use:
the control stream is QUIC stream 0 (opened right after the handshake), and each new request
id takes the next free one (4, 8, 12, ...). The client starts each QUIC stream with a *stream
header*, the contract's id as a QUIC varint, and the server maps the QUIC stream back to that
id. The ids are not turned into QUIC stream numbers arithmetically because QUIC opens every
lower-numbered stream implicitly and limits how many may be open: a request id such as
2**31 - 1 would otherwise need a billion streams. A server cannot open streams of its own.

Frames: a QUIC varint (RFC 9000 section 16) giving the body's length, then the body. Token
frames are tens of bytes, so the 1-2 byte prefix matters more than a fixed u32 would.
"""

from __future__ import annotations

import dataclasses

from aioquic.buffer import UINT_VAR_MAX, Buffer, encode_uint_var

MAX_VARINT = UINT_VAR_MAX  # 2**62 - 1


def encode_varint(value: int) -> bytes:
    """``value`` as a QUIC varint (aioquic's encoder; ValueError out of 0..MAX_VARINT)."""
    if not 0 <= value <= MAX_VARINT:  # aioquic's own message would call -1 "too big"
        raise ValueError(f"{value!r} does not fit a QUIC varint")
    return encode_uint_var(value)


def encode_frame(frame: bytes) -> bytes:
    """One frame as it goes on the wire: length prefix, then body."""
    return encode_varint(len(frame)) + frame


def encode_stream_header(stream_id: int) -> bytes:
    """What the client writes first on a QUIC stream it opens for contract stream ``stream_id``."""
    return encode_varint(stream_id)


@dataclasses.dataclass(frozen=True)
class StreamHeader:
    """The decoder's first output on a stream that starts with a stream header."""

    stream_id: int


@dataclasses.dataclass(frozen=True)
class Oversized:
    """Stands in the decoder's output for a frame that was over the limit and skipped."""

    size: int


Decoded = bytes | Oversized | StreamHeader


class FrameDecoder:
    """Splits one stream's bytes into frames, in order, whatever the chunking.

    With ``stream_header``, the stream's first varint is reported as a ``StreamHeader``. A frame
    whose length prefix exceeds ``max_frame_size`` is reported as ``Oversized`` as soon as the
    prefix is read, and its body is then discarded as it arrives, never buffered; the frames
    after it decode normally.
    """

    def __init__(self, max_frame_size: int, *, stream_header: bool = False) -> None:
        self._max = max_frame_size
        self._header_pending = stream_header
        self._header = bytearray()  # a length prefix split across chunks
        self._body = bytearray()
        self._need: int | None = None  # body bytes still missing; None while reading a prefix
        self._skip = 0  # bytes of an oversized body still to discard

    @property
    def mid_frame(self) -> bool:
        """True when a frame has started but not ended (a FIN now would cut it)."""
        return bool(self._header) or self._need is not None or self._skip > 0

    def feed(self, data: bytes) -> list[Decoded]:
        out: list[Decoded] = []
        view = memoryview(data)
        while view:
            if self._skip:
                dropped = min(self._skip, len(view))
                self._skip -= dropped
                view = view[dropped:]
            elif self._need is None:
                view = self._read_prefix(view, out)
            else:
                taken = min(self._need, len(view))
                self._body += view[:taken]
                self._need -= taken
                view = view[taken:]
                if self._need == 0:
                    out.append(bytes(self._body))
                    self._body.clear()
                    self._need = None
        return out

    def _read_prefix(self, view: memoryview, out: list[Decoded]) -> memoryview:
        first = self._header[0] if self._header else view[0]
        width = 1 << (first >> 6)  # the top two bits give the varint's length (RFC 9000 16)
        if not self._header and len(view) >= width:  # common case: the whole prefix is here
            prefix = bytes(view[:width])
            view = view[width:]
        else:
            take = min(width - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) < width:
                return view
            prefix = bytes(self._header)
            self._header.clear()
        size = Buffer(data=prefix).pull_uint_var()
        if self._header_pending:
            self._header_pending = False
            out.append(StreamHeader(size))
        elif size > self._max:
            out.append(Oversized(size))
            self._skip = size
        elif size == 0:
            out.append(b"")
        else:
            self._need = size
        return view


class StreamTable:
    """Which QUIC stream carries which contract stream, on one side of a connection.

    An entry lives until both directions of its QUIC stream have ended (FIN or reset each way),
    which is also when QUIC frees the stream.
    """

    def __init__(self) -> None:
        self._quic_of: dict[int, int] = {}  # contract id -> QUIC id (the latest, if reused)
        self._contract_of: dict[int, int] = {}  # QUIC id -> contract id
        self._fin_sent: set[int] = set()
        self._fin_received: set[int] = set()

    def __len__(self) -> int:
        return len(self._contract_of)

    def quic_id(self, stream_id: int) -> int | None:
        return self._quic_of.get(stream_id)

    def contract_id(self, quic_id: int) -> int | None:
        return self._contract_of.get(quic_id)

    def bind(self, stream_id: int, quic_id: int) -> None:
        self._quic_of[stream_id] = quic_id
        self._contract_of[quic_id] = stream_id

    def sent_fin(self, quic_id: int) -> None:
        self._fin_sent.add(quic_id)
        self._forget_if_done(quic_id)

    def received_fin(self, quic_id: int) -> None:
        self._fin_received.add(quic_id)
        self._forget_if_done(quic_id)

    def _forget_if_done(self, quic_id: int) -> None:
        if quic_id not in self._fin_sent or quic_id not in self._fin_received:
            return
        self._fin_sent.discard(quic_id)
        self._fin_received.discard(quic_id)
        stream_id = self._contract_of.pop(quic_id, None)
        if stream_id is not None and self._quic_of.get(stream_id) == quic_id:
            del self._quic_of[stream_id]
