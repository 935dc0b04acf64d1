"""The sans-IO protocol: round trips, hostile bytes, and both connection state machines."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydisco.cloud import protocol as P
from pydisco._types import GenerationRequest, GenerationResult, Sampling, TokenPiece

# -- strategies ---------------------------------------------------------------------------

u31 = st.integers(0, 2**31 - 1)
u63 = st.integers(0, 2**63 - 1)
text = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)

samplings = st.builds(
    Sampling,
    temperature=st.floats(0, 5, allow_nan=False),
    top_p=st.floats(0.01, 1.0),
    top_k=st.integers(0, 1000),
    seed=u63,
)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text}),
                    min_size=1, max_size=4)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> GenerationRequest:
    chat = draw(st.booleans())
    resume = draw(st.sampled_from(["none", "ids", "text"]))
    return GenerationRequest(
        messages=draw(messages) if chat else None,
        prompt=None if chat else draw(text),
        max_tokens=draw(st.integers(1, 2**31 - 1)),
        sampling=draw(samplings),
        stop=tuple(draw(st.lists(text.filter(bool), max_size=3))),
        resume_token_ids=tuple(draw(st.lists(u31, max_size=5))) if resume == "ids" else (),
        resume_text=draw(text) if resume == "text" else None,
        resume_position=draw(st.none() | u31),
        request_id=draw(text),
    )


frames = st.one_of(
    st.builds(P.Hello, st.lists(st.integers(1, 0xFFFF), min_size=1, max_size=4).map(tuple), text),
    st.builds(P.Welcome, st.integers(1, 0xFFFF), text, st.integers(64, 2**40), st.integers(1, 2**31 - 1),
              st.floats(0, 1e6, allow_nan=False), text),  # fmt: skip
    st.builds(P.Auth, text),
    st.just(P.AuthOk()),
    st.builds(P.Generate, requests(), st.none() | st.floats(1e-3, 1e6)),
    st.builds(P.ReaderReport, u31, st.floats(1e-3, 1e6), u31),
    st.builds(P.Token, st.builds(TokenPiece, u31, st.integers(-1, 2**31 - 1), text), u63, u63),
    st.builds(P.Done, st.builds(GenerationResult, st.sampled_from(["stop", "length", "cancelled"]), u31, u31, u31,
                                st.floats(0, 1e9, allow_nan=False)), u63),  # fmt: skip
    st.just(P.Cancel()),
    st.just(P.Paused()),
    st.builds(P.Error, st.sampled_from(sorted(P.ERROR_CODES)), text),
    st.builds(P.Ping, u63),
    st.builds(P.Pong, u63),
)

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | text | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text | st.sampled_from(["t", "v", "pos"]), inner, max_size=5),
    max_leaves=20,
)
frame_types = st.sampled_from(["hello", "welcome", "auth", "auth_ok", "generate", "token", "done", "cancel", "error",
                               "ping", "pong", "reader_report", "paused", "nope", ""])  # fmt: skip


# -- codec --------------------------------------------------------------------------------


@given(frames)
def test_every_frame_survives_a_round_trip(frame: P.Frame) -> None:
    assert P.decode(P.encode(frame)) == frame


def _decode_safely(data: bytes) -> P.Frame | None:
    try:
        return P.decode(data, max_frame_size=1 << 16)
    except P.ProtocolError as e:
        assert e.code in P.ERROR_CODES
        return None


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    _decode_safely(data)


@given(msgpack_values)
def test_arbitrary_msgpack_values_never_crash_the_decoder(value: object) -> None:
    _decode_safely(msgpack.packb(value, use_bin_type=True))


@given(frame_types, st.dictionaries(st.sampled_from(["v", "model", "max_frame", "max_streams", "hb", "token", "id",
       "messages", "prompt", "max_tokens", "sampling", "stop", "resume_ids", "resume_text", "resume_pos", "pos",
       "text", "tg", "ts", "finish", "prompt_tokens", "generated", "prefilled", "cost", "code", "msg", "n", "buffered",
       "rate"]),
       msgpack_values, max_size=8))  # fmt: skip
def test_frames_of_known_types_with_random_fields_never_crash_the_decoder(kind: str, fields: dict[str, object]) -> None:
    _decode_safely(msgpack.packb({"t": kind, **fields}, use_bin_type=True))


@given(frames, st.data())
def test_a_truncated_frame_is_a_protocol_error_or_another_valid_frame(frame: P.Frame, data: st.DataObject) -> None:
    raw = P.encode(frame)
    cut = data.draw(st.integers(0, len(raw) - 1))
    _decode_safely(raw[:cut])


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"\xc1", P.Code.BAD_FRAME),  # never-used msgpack byte
        (msgpack.packb([1, 2]), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "warp"}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "ping", "n": "1"}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "ping", "n": True}), P.Code.BAD_FRAME),  # bool is not an int here
        (msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": "ten"}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 0}), P.Code.BAD_REQUEST),
        (msgpack.packb({"t": "generate", "max_tokens": 4}), P.Code.BAD_REQUEST),  # neither prompt nor messages
        (msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 4, "sampling": {"top_p": 0.0}}), P.Code.BAD_REQUEST),
        (msgpack.packb({"t": "token", "pos": -1, "id": 0, "text": ""}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "hello", "v": []}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "ping", "n": 1}) + b"\x00", P.Code.BAD_FRAME),  # trailing bytes
        (msgpack.packb({"t": "ping", "n": msgpack.ExtType(5, b"x")}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "reader_report", "buffered": -1, "rate": 4.5, "pos": 0}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "reader_report", "buffered": 3, "rate": 0.0, "pos": 0}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "reader_report", "buffered": 3, "rate": float("nan"), "pos": 0}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "reader_report", "buffered": 3, "rate": 4.5}), P.Code.BAD_FRAME),  # no pos
        (msgpack.packb({"t": "reader_report", "buffered": True, "rate": 4.5, "pos": 0}), P.Code.BAD_FRAME),
        (msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 4, "rate": -2.0}), P.Code.BAD_REQUEST),
        (msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 4, "rate": "fast"}), P.Code.BAD_FRAME),
    ],
)
def test_malformed_frames_have_stable_codes(wire: bytes, code: str) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(wire)
    assert info.value.code == code


def test_oversized_frames_are_refused_before_parsing() -> None:
    data = P.encode(P.Auth("x" * 100))
    with pytest.raises(P.ProtocolError) as info:
        P.decode(data, max_frame_size=50)
    assert info.value.code == P.Code.FRAME_TOO_LARGE


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert P.decode(msgpack.packb({"t": "ping", "n": 3, "future": [1, 2]})) == P.Ping(3)


def test_the_bearer_token_is_not_in_the_repr() -> None:
    assert "s3cret" not in repr(P.Auth("s3cret"))


# -- server state machine -----------------------------------------------------------------


def make_server(max_streams: int = 4) -> P.ServerProtocol:
    return P.ServerProtocol(check_token=lambda t: t == "good", model="m", max_frame_size=1 << 16,
                            max_streams=max_streams, heartbeat_interval=5.0)  # fmt: skip


def frames_of(outputs: list[P.ServerOutput]) -> list[tuple[int, P.Frame]]:
    return [(o.stream_id, P.decode(o.data)) for o in outputs if isinstance(o, P.Send)]


def gen(prompt: str = "hi", **kw: object) -> bytes:
    return P.encode(P.Generate(GenerationRequest(prompt=prompt, max_tokens=4, **kw)))  # type: ignore[arg-type]


def authed(max_streams: int = 4, versions: tuple[int, ...] = (1,)) -> P.ServerProtocol:
    server = make_server(max_streams)
    server.receive(0, P.encode(P.Hello(versions)))
    server.receive(0, P.encode(P.Auth("good")))
    assert server.state is P.ServerState.READY
    return server


def test_handshake_negotiates_the_highest_common_version() -> None:
    server = P.ServerProtocol(check_token=lambda t: True, model="m", max_frame_size=1024, max_streams=1,
                              heartbeat_interval=1.0, versions=(1, 2, 3))  # fmt: skip
    [(sid, welcome)] = frames_of(server.receive(0, P.encode(P.Hello((2, 5, 1)))))
    assert sid == 0 and isinstance(welcome, P.Welcome) and welcome.version == 2
    assert welcome.max_frame_size == 1024 and welcome.model == "m"


def test_no_common_version_closes_with_unsupported_version() -> None:
    out = make_server().receive(0, P.encode(P.Hello((7,))))
    assert frames_of(out) == [(0, P.Error(P.Code.UNSUPPORTED_VERSION, frames_of(out)[0][1].message))]  # type: ignore[union-attr]
    assert isinstance(out[-1], P.CloseConnection)


def test_generate_before_auth_is_unauthorized_and_starts_nothing() -> None:
    server = make_server()
    server.receive(0, P.encode(P.Hello((1,))))
    out = server.receive(1, gen())
    assert not any(isinstance(o, P.StartStream) for o in out)
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.UNAUTHORIZED
    assert server.receive(0, P.encode(P.Auth("good"))) == []  # closed for good


def test_a_bad_generate_before_auth_is_still_unauthorized() -> None:
    server = make_server()
    server.receive(0, P.encode(P.Hello((1,))))
    out = server.receive(1, msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 0}))
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.UNAUTHORIZED


@pytest.mark.parametrize("fields", [{}, {"token": 5}, {"token": None}, {"token": b"good"}])
def test_an_auth_frame_without_a_string_token_is_unauthorized(fields: dict[str, object]) -> None:
    server = make_server()
    server.receive(0, P.encode(P.Hello((1,))))
    out = server.receive(0, msgpack.packb({"t": "auth", **fields}, use_bin_type=True))
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.UNAUTHORIZED
    assert [f.code for _, f in frames_of(out) if isinstance(f, P.Error)] == [P.Code.UNAUTHORIZED]


def test_wrong_token_is_unauthorized() -> None:
    server = make_server()
    server.receive(0, P.encode(P.Hello((1,))))
    out = server.receive(0, P.encode(P.Auth("bad")))
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.UNAUTHORIZED
    assert server.state is P.ServerState.CLOSED


def test_stream_ids_must_be_odd_and_never_reused() -> None:
    server = authed()
    assert isinstance(server.receive(3, gen())[0], P.StartStream)
    for bad in (2, 3, 0, P.MAX_STREAM_ID + 2):
        s = authed()
        s.receive(3, gen())
        out = s.receive(bad, gen())
        assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.BAD_STREAM, bad


def test_stream_ids_may_arrive_out_of_order() -> None:
    # QUIC orders data within a stream only: a lower id's first datagram can be overtaken.
    server = authed()
    for sid in (5, 1, 3):
        [start] = server.receive(sid, gen())
        assert start == P.StartStream(sid, P.decode(gen()).request)  # type: ignore[union-attr]
    out = server.receive(1, gen())
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.BAD_STREAM


def test_a_refused_stream_uses_its_id_too() -> None:
    server = authed()
    bad = msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 0})
    assert frames_of(server.receive(3, bad))[0][0] == 3
    assert isinstance(server.receive(1, gen())[0], P.StartStream)
    out = server.receive(3, gen())
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.BAD_STREAM


@given(st.lists(st.integers(0, 40), min_size=1, max_size=300))
def test_used_stream_ids_stay_bounded_and_are_never_accepted_twice(steps: list[int]) -> None:
    # Ids move up with gaps (steps of 0 repeat an id); a lagging id comes back now and then.
    window = 8
    used = P.UsedStreamIds(window)
    accepted: set[int] = set()
    sid = 1
    for i, step in enumerate(steps):
        sid = min(sid + 2 * step, P.MAX_STREAM_ID)
        candidate = max(1, sid - 2 * (i % 5)) if i % 3 == 0 else sid
        if used.claim(candidate):
            assert candidate not in accepted
            accepted.add(candidate)
        assert len(used) <= window


def test_used_stream_ids_forget_nothing_within_the_window() -> None:
    used = P.UsedStreamIds(4)
    assert all(used.claim(sid) for sid in (9, 7, 5, 3))  # four ids overtook id 1
    assert used.claim(1)  # still within the window: accepted
    assert len(used) == 0  # 1..9 are contiguous now: all below the floor
    assert not any(used.claim(sid) for sid in (1, 3, 5, 7, 9))
    assert all(used.claim(sid) for sid in (21, 19, 17, 15, 13))  # the fifth pushes the floor up
    assert len(used) <= 4
    assert not used.claim(11)  # so far behind that it counts as used


def test_connection_frames_belong_on_stream_zero() -> None:
    out = authed().receive(5, P.encode(P.Ping(1)))
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.BAD_STREAM


def test_too_many_streams_refuses_the_stream_but_keeps_the_connection() -> None:
    server = authed(max_streams=1)
    assert isinstance(server.receive(1, gen())[0], P.StartStream)
    [(sid, err)] = frames_of(server.receive(3, gen()))
    assert sid == 3 and isinstance(err, P.Error) and err.code == P.Code.TOO_MANY_STREAMS
    assert server.state is P.ServerState.READY


def test_a_semantically_bad_request_fails_only_its_stream() -> None:
    server = authed()
    [(sid, err)] = frames_of(server.receive(1, msgpack.packb({"t": "generate", "prompt": "x", "max_tokens": 0})))
    assert sid == 1 and isinstance(err, P.Error) and err.code == P.Code.BAD_REQUEST
    assert isinstance(server.receive(3, gen())[0], P.StartStream)


def test_cancel_stops_tokens_and_done_acknowledges() -> None:
    server = authed()
    server.receive(1, gen())
    assert server.token(1, TokenPiece(0, 5, "a"), 1, 2) is not None
    assert server.receive(1, P.encode(P.Cancel())) == [P.CancelStream(1)]
    assert server.receive(1, P.encode(P.Cancel())) == []  # a repeat is harmless
    assert server.token(1, TokenPiece(1, 5, "b"), 1, 2) is None
    ack = server.done(1, GenerationResult("cancelled", 0, 0, 1), 3)
    assert ack is not None and P.decode(ack) == P.Done(GenerationResult("cancelled", 0, 0, 1), 3)
    assert server.done(1, GenerationResult("stop", 0, 0, 1), 3) is None
    assert server.receive(1, P.encode(P.Cancel())) == []  # cancel after the end: nothing to do


def test_ping_is_answered_with_the_same_nonce() -> None:
    assert frames_of(authed().receive(0, P.encode(P.Ping(42)))) == [(0, P.Pong(42))]


def test_the_first_frame_must_be_hello() -> None:
    out = make_server().receive(0, P.encode(P.Auth("good")))
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.BAD_FRAME


def test_server_types_sent_by_a_client_are_bad_frames() -> None:
    out = authed().receive(1, P.encode(P.Token(TokenPiece(0, 0, "x"))))
    assert isinstance(out[-1], P.CloseConnection) and out[-1].code == P.Code.BAD_FRAME


class ServerMachine(RuleBasedStateMachine):
    """Random client frames against the server protocol: nothing raises, model work only after
    a valid auth, never more open streams than the limit, nothing at all after a close."""

    @initialize()
    def make(self) -> None:
        self.server = make_server(max_streams=2)
        self.hello = self.authed = self.closed = False
        self.next_sid = 1

    def feed(self, sid: int, data: bytes) -> list[P.ServerOutput]:
        open_before = set(self.server.open_streams)
        out = self.server.receive(sid, data)
        if self.closed:
            assert out == []
        for o in out:
            if isinstance(o, P.StartStream):
                assert self.authed and not self.closed
            if isinstance(o, P.ReaderReported):  # only for a stream it is serving, in version 2
                assert self.authed and self.server.version >= 2 and o.stream_id in open_before
            if isinstance(o, P.CloseConnection):
                self.closed = True
        return out

    @rule(versions=st.lists(st.integers(1, 3), min_size=1, max_size=3))
    def hello(self, versions: list[int]) -> None:
        was_first = not self.hello
        self.feed(0, P.encode(P.Hello(tuple(versions))))
        if not self.closed and was_first and set(versions) & set(P.PROTOCOL_VERSIONS):
            self.hello = True

    @rule(token=st.sampled_from(["good", "bad", ""]))
    def auth(self, token: str) -> None:
        was_waiting = self.hello and not self.authed
        self.feed(0, P.encode(P.Auth(token)))
        if not self.closed and was_waiting:
            assert token == "good"
            self.authed = True

    @rule(step=st.sampled_from([0, 2]))
    def generate(self, step: int) -> None:
        self.feed(self.next_sid, gen())
        self.next_sid += step

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.feed(data.draw(st.sampled_from([0, 1, 3, 5, 7])), P.encode(P.Cancel()))

    @rule(sid=st.sampled_from([0, 1, 3, 5, 7]), buffered=st.integers(0, 50))
    def reader_report(self, sid: int, buffered: int) -> None:
        self.feed(sid, P.encode(P.ReaderReport(buffered, 4.5, 0)))

    @precondition(lambda self: bool(self.server.open_streams))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.server.open_streams)))
        assert self.server.done(sid, GenerationResult("stop", 1, 1, 1), 0) is not None

    @rule(garbage=st.binary(max_size=30), sid=st.sampled_from([0, 1, 2, 9]))
    def garbage(self, garbage: bytes, sid: int) -> None:
        self.feed(sid, garbage)

    @rule(n=u63)
    def ping(self, n: int) -> None:
        out = self.feed(0, P.encode(P.Ping(n)))
        if not self.closed and self.hello:
            assert frames_of(out) == [(0, P.Pong(n))]

    @invariant()
    def limits_hold(self) -> None:
        assert len(self.server.open_streams) <= 2
        assert (self.server.state is P.ServerState.CLOSED) == self.closed
        if self.closed:
            assert not self.server.open_streams


TestServerMachine = ServerMachine.TestCase
TestServerMachine.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


# -- client state machine -----------------------------------------------------------------


def ready_client() -> P.ClientProtocol:
    client = P.ClientProtocol(token="good")
    hello, auth = client.handshake()
    assert P.decode(hello) == P.Hello(P.PROTOCOL_VERSIONS, "") and P.decode(auth) == P.Auth("good")
    assert client.receive(0, P.encode(P.Welcome(1, "m", 4096, 8, 5.0))) == []
    [ready] = client.receive(0, P.encode(P.AuthOk()))
    assert isinstance(ready, P.Ready) and ready.welcome.model == "m"
    return client


def test_client_checks_token_positions() -> None:
    client = ready_client()
    sid, _ = client.open_stream(GenerationRequest(prompt="x", max_tokens=5, resume_token_ids=(7, 8)))
    [tok] = client.receive(sid, P.encode(P.Token(TokenPiece(2, 1, "a"))))
    assert isinstance(tok, P.TokenReceived) and tok.piece.position == 2
    [close] = client.receive(sid, P.encode(P.Token(TokenPiece(4, 1, "a"))))
    assert isinstance(close, P.CloseConnection) and close.code == P.Code.BAD_FRAME


def test_client_drops_late_frames_of_a_forgotten_stream_only() -> None:
    client = ready_client()
    sid, _ = client.open_stream(GenerationRequest(prompt="x", max_tokens=5))
    assert client.forget(sid) == P.encode(P.Cancel())
    assert client.forget(sid) is None
    assert client.receive(sid, P.encode(P.Token(TokenPiece(0, 1, "a")))) == []
    assert client.receive(sid, P.encode(P.Done(GenerationResult("cancelled", 0, 0, 1)))) == []
    [close] = client.receive(sid + 2, P.encode(P.Token(TokenPiece(0, 1, "a"))))
    assert isinstance(close, P.CloseConnection)


def test_client_refuses_a_request_over_the_servers_frame_limit() -> None:
    client = ready_client()
    with pytest.raises(P.ProtocolError) as info:
        client.open_stream(GenerationRequest(prompt="x" * 5000, max_tokens=5))
    assert info.value.code == P.Code.FRAME_TOO_LARGE
    sid, _ = client.open_stream(GenerationRequest(prompt="x", max_tokens=5))
    assert sid == 1  # the refused request used no stream id


def test_client_pings_carry_nonces_that_the_pongs_bring_back() -> None:
    client = ready_client()
    first, data = client.ping()
    assert P.decode(data) == P.Ping(first)
    second, _ = client.ping()
    assert second != first
    assert client.receive(0, P.encode(P.Pong(first))) == [P.PongReceived(first)]


def test_client_reports_a_connection_error_and_stops() -> None:
    client = ready_client()
    [close] = client.receive(0, P.encode(P.Error(P.Code.SHUTTING_DOWN, "bye")))
    assert close == P.CloseConnection(P.Code.SHUTTING_DOWN, "bye")
    assert client.receive(0, P.encode(P.Ping(1))) == []


@given(st.lists(st.tuples(st.sampled_from([0, 1, 3]), st.binary(max_size=40) | frames.map(P.encode)), max_size=12))
def test_client_never_raises_on_server_input(inputs: list[tuple[int, bytes]]) -> None:
    client = P.ClientProtocol(token="t")
    client.handshake()
    for sid, data in inputs:
        client.receive(sid, data)


# -- reader reports (version 2) -----------------------------------------------------------


def report(buffered: int = 3, rate: float = 4.5, received: int = 0) -> bytes:
    return P.encode(P.ReaderReport(buffered, rate, received))


def test_a_reader_report_on_an_open_stream_reaches_the_server_and_the_rate_comes_with_generate() -> None:
    server = authed(versions=(1, 2))
    assert server.version == 2
    [start] = server.receive(1, P.encode(P.Generate(GenerationRequest(prompt="hi", max_tokens=4), 6.0)))
    assert isinstance(start, P.StartStream) and start.reading_rate == 6.0
    assert server.receive(1, report(7, 5.0, 2)) == [P.ReaderReported(1, P.ReaderReport(7, 5.0, 2))]


def test_a_report_after_the_stream_ended_or_was_cancelled_is_ignored() -> None:
    server = authed(versions=(1, 2))
    server.receive(1, gen())
    server.receive(3, gen())
    server.done(1, GenerationResult("stop", 1, 1, 1), 0)
    assert server.receive(1, report()) == []  # crossed the done frame
    server.receive(3, P.encode(P.Cancel()))
    assert server.receive(3, report()) == []
    assert server.state is P.ServerState.READY


@pytest.mark.parametrize(
    ("setup", "stream", "code"),
    [
        ("v1", 1, P.Code.BAD_FRAME),  # a version 1 peer never sends it; an old server would close too
        ("unauthenticated", 1, P.Code.UNAUTHORIZED),
        ("v2", 0, P.Code.BAD_STREAM),
    ],
)
def test_a_reader_report_out_of_place_closes_with_a_clear_code(setup: str, stream: int, code: str) -> None:
    server = make_server()
    server.receive(0, P.encode(P.Hello((1,) if setup == "v1" else (1, 2))))
    if setup != "unauthenticated":
        server.receive(0, P.encode(P.Auth("good")))
        server.receive(1, gen())
    outputs = server.receive(stream, report())
    assert isinstance(outputs[-1], P.CloseConnection) and outputs[-1].code == code
    assert frames_of(outputs)[0][1] == P.Error(code, outputs[-1].message)


def test_a_malformed_report_closes_the_connection_as_any_malformed_frame() -> None:
    server = authed(versions=(2,))
    server.receive(1, gen())
    outputs = server.receive(1, msgpack.packb({"t": "reader_report", "buffered": 3, "rate": -1.0, "pos": 0}))
    assert isinstance(outputs[-1], P.CloseConnection) and outputs[-1].code == P.Code.BAD_FRAME
    assert "rate" in outputs[-1].message


def client_at(version: int) -> P.ClientProtocol:
    client = P.ClientProtocol(token="good")
    client.receive(0, P.encode(P.Welcome(version, "m", 1 << 16, 4, 5.0)))
    client.receive(0, P.encode(P.AuthOk()))
    assert client.state is P.ClientState.READY
    return client


def test_a_client_reports_only_to_a_version_2_server_and_only_on_streams_it_follows() -> None:
    old = client_at(1)
    sid, _ = old.open_stream(GenerationRequest(prompt="hi", max_tokens=4), 4.5)
    assert not old.reports_readers and old.reader_report(sid, 3, 4.5) is None
    new = client_at(2)
    sid, _ = new.open_stream(GenerationRequest(prompt="hi", max_tokens=4), 4.5)
    new.receive(sid, P.encode(P.Token(TokenPiece(0, 1, "a"))))
    assert P.decode(new.reader_report(sid, 3, 4.5) or b"") == P.ReaderReport(3, 4.5, 1)
    new.forget(sid)
    assert new.reader_report(sid, 3, 4.5) is None


def test_a_server_that_sends_a_reader_report_is_a_broken_peer() -> None:
    client = client_at(2)
    sid, _ = client.open_stream(GenerationRequest(prompt="hi", max_tokens=4))
    [close] = client.receive(sid, report())
    assert isinstance(close, P.CloseConnection) and close.code == P.Code.BAD_FRAME


def test_the_server_says_paused_only_to_a_version_2_client_on_an_open_stream() -> None:
    old = authed()
    old.receive(1, gen())
    assert old.paused(1) is None  # a version 1 client would not know the frame
    server = authed(versions=(1, 2))
    server.receive(1, gen())
    server.receive(3, gen())
    assert P.decode(server.paused(1) or b"") == P.Paused()
    server.receive(3, P.encode(P.Cancel()))
    server.done(1, GenerationResult("stop", 1, 1, 1), 0)
    assert server.paused(1) is None and server.paused(3) is None


def test_a_version_2_client_hears_paused_and_a_version_1_client_refuses_it() -> None:
    new = client_at(2)
    sid, _ = new.open_stream(GenerationRequest(prompt="hi", max_tokens=4))
    assert new.receive(sid, P.encode(P.Paused())) == [P.StreamPaused(sid)]
    new.forget(sid)
    assert new.receive(sid, P.encode(P.Paused())) == []  # late, for a stream it stopped following
    old = client_at(1)
    sid, _ = old.open_stream(GenerationRequest(prompt="hi", max_tokens=4))
    [close] = old.receive(sid, P.encode(P.Paused()))
    assert isinstance(close, P.CloseConnection) and close.code == P.Code.BAD_FRAME
