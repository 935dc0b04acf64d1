"""Wire format of the QUIC transport: which QUIC stream carries a frame stream, and how frames
are delimited on it. Pure functions and a sans-IO decoder, no I/O.

Stream ids: the contract numbers streams 0 (connection control) and 1, 3, 5, ... (requests,
chosen by the client). All of them ride on client-initiated bidirectional QUIC streams, whose
ids are 0, 4, 8, ...; the mapping is dense (0 -> 0, 1 -> 4, 3 -> 8, 5 -> 12), so request *k*
uses QUIC stream *k* and no QUIC stream is skipped. A skipped QUIC stream would be opened
implicitly by the peer and hold one of its stream credits for the life of the connection.

Frames: a QUIC variable-length integer (RFC 9000 section 16) giving the body's length, then the
body. Token frames are tens of bytes, so the 1-2 byte prefix matters more than a fixed u32.
"""

from __future__ import annotations

import dataclasses

MAX_VARINT = (1 << 62) - 1

CONTROL_PREFACE = b"\x01"
"""Sent by the client as the first byte of QUIC stream 0. A server cannot send on a
client-initiated stream the client has not opened yet, so the client opens the control stream
straight after the handshake; the byte also versions this framing."""


def quic_stream_id(stream_id: int) -> int:
    """The QUIC stream that carries the contract's ``stream_id`` (0 or odd)."""
    if stream_id == 0:
        return 0
    if stream_id < 0 or stream_id % 2 == 0:
        raise ValueError(f"stream ids are 0 (control) or odd (requests), got {stream_id!r}")
    return 2 * (stream_id + 1)


def frame_stream_id(quic_id: int) -> int | None:
    """The contract's stream id carried by QUIC stream ``quic_id``, or None when that QUIC
    stream is not a client-initiated bidirectional one (the transport never uses those)."""
    if quic_id % 4 != 0:
        return None
    return 0 if quic_id == 0 else quic_id // 2 - 1


def encode_varint(value: int) -> bytes:
    if value < 0 or value > MAX_VARINT:
        raise ValueError(f"{value!r} does not fit a QUIC varint")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def encode_frame(frame: bytes) -> bytes:
    """One frame as it goes on the wire: length prefix, then body."""
    return encode_varint(len(frame)) + frame


@dataclasses.dataclass(frozen=True)
class Oversized:
    """Stands in the decoder's output for a frame that was over the limit and skipped."""

    size: int


class FrameDecoder:
    """Splits one stream's bytes into frames, in order, whatever the chunking.

    A frame whose length prefix exceeds ``max_frame_size`` is reported as ``Oversized`` as soon
    as the prefix is read, and its body is then discarded as it arrives, never buffered; the
    frames after it decode normally.
    """

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._header = bytearray()  # a length prefix split across chunks
        self._body = bytearray()
        self._need: int | None = None  # body bytes still missing; None while reading a prefix
        self._skip = 0  # bytes of an oversized body still to discard

    @property
    def mid_frame(self) -> bool:
        """True when a frame has started but not ended (a FIN now would cut it)."""
        return bool(self._header) or self._need is not None or self._skip > 0

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
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

    def _read_prefix(self, view: memoryview, out: list[bytes | Oversized]) -> memoryview:
        first = self._header[0] if self._header else view[0]
        width = 1 << (first >> 6)  # the top two bits give the prefix's length
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
        size = int.from_bytes(prefix, "big") & ((1 << (8 * width - 2)) - 1)
        if size > self._max:
            out.append(Oversized(size))
            self._skip = size
        elif size == 0:
            out.append(b"")
        else:
            self._need = size
        return view
