"""The QUIC transport's wire format: varints, frame decoding under any chunking, stream table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

if TYPE_CHECKING:  # mypy reads the source tree
    from pydisco.transports import _quic_framing as framing
else:
    try:
        from pydisco.transports import _quic_framing as framing
    except ImportError:  # a source tree without the installed package
        from pydisco.transports import _quic_framing as framing


def decode_all(data: bytes, cuts: list[int], max_size: int, header: bool = False) -> list[object]:
    decoder = framing.FrameDecoder(max_size, stream_header=header)
    out: list[object] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += decoder.feed(data[start:cut])
        start = cut
    assert not decoder.mid_frame
    return out


@pytest.mark.parametrize(
    "value", [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, framing.MAX_VARINT]
)
def test_varint_widths_round_trip(value: int) -> None:
    encoded = framing.encode_varint(value)
    assert len(encoded) == 1 << (encoded[0] >> 6)
    (header,) = framing.FrameDecoder(0, stream_header=True).feed(encoded)
    assert header == framing.StreamHeader(value)


def test_varint_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        framing.encode_varint(framing.MAX_VARINT + 1)
    with pytest.raises(ValueError):
        framing.encode_varint(-1)


@given(
    frames=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
    max_size=st.integers(min_value=0, max_value=200),
    stream_id=st.integers(min_value=0, max_value=framing.MAX_VARINT),
)
def test_frames_decode_whatever_the_chunking(
    frames: list[bytes], cuts: list[int], max_size: int, stream_id: int
) -> None:
    wire = framing.encode_stream_header(stream_id) + b"".join(framing.encode_frame(f) for f in frames)
    cuts = [c for c in cuts if c <= len(wire)]
    expected: list[object] = [framing.StreamHeader(stream_id)]
    expected += [f if len(f) <= max_size else framing.Oversized(len(f)) for f in frames]
    assert decode_all(wire, cuts, max_size, header=True) == expected


def test_an_oversized_frame_is_reported_from_its_prefix_alone() -> None:
    decoder = framing.FrameDecoder(1024)
    huge = 1 << 40  # never sent: the prefix alone must be enough to refuse it
    assert decoder.feed(framing.encode_varint(huge)) == [framing.Oversized(huge)]
    assert decoder.mid_frame  # its body is still to be skipped
    assert decoder.feed(b"\0" * 100_000) == []
    assert decoder.mid_frame


def test_the_stream_table_forgets_a_stream_ended_both_ways() -> None:
    table = framing.StreamTable()
    table.bind(5, 8)
    table.sent_fin(8)
    assert table.quic_id(5) == 8 and table.contract_id(8) == 5
    table.received_fin(8)
    assert table.quic_id(5) is None and table.contract_id(8) is None and len(table) == 0


def test_the_stream_table_keeps_the_newest_stream_of_a_reused_id() -> None:
    table = framing.StreamTable()
    table.bind(1, 4)
    table.bind(1, 12)  # the client reused id 1 on a new QUIC stream before 4 was finished
    table.sent_fin(4)
    table.received_fin(4)
    assert table.quic_id(1) == 12 and table.contract_id(12) == 1
