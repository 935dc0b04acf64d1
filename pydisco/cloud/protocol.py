"""pydisco's cloud wire protocol, sans-IO: frames, their validation, and both ends' state.

Nothing here touches a socket or a clock. A transport (transports/) moves ``(stream_id, bytes)``
pairs; :class:`ServerProtocol` and :class:`ClientProtocol` turn received bytes into events and
produce the bytes to send. Every frame is a msgpack map with a short type key ``"t"``;
docs/protocol.md is the reference for frames, fields, codes and fault handling.

Decoding never raises anything but :class:`ProtocolError` (with a stable ``code``), whatever the
bytes: a peer cannot crash the other end with a malformed frame.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Union

import msgpack  # type: ignore[import-untyped]  # ships no type information

from .._errors import PydiscoError
from .._types import GenerationRequest, GenerationResult, Message, Sampling, TokenPiece

PROTOCOL_VERSIONS: Final = (1, 2, 3)
"""Versions this implementation speaks, oldest first; the server picks the highest in common.
Version 2 adds the client's ``reader_report`` and the server's ``paused`` frames; version 3 the
server's ``tokens`` frame, several consecutive tokens of one answer (docs/protocol.md,
Versioning)."""

READER_REPORT_VERSION: Final = 2
"""The first version with ``reader_report`` (client) and ``paused`` (server)."""

TOKENS_VERSION: Final = 3
"""The first version with the server's ``tokens`` frame (natural batching)."""

MAX_BATCH_TOKENS: Final = 256
"""Most tokens one ``tokens`` frame carries (a sender's choice; a receiver takes up to 4096)."""

CONNECTION_STREAM: Final = 0
"""Stream 0 carries hello, auth, heartbeats and connection errors."""

MAX_STREAM_ID: Final = (1 << 31) - 1
_MAX_U31: Final = (1 << 31) - 1  # positions, token ids, max_tokens
_MAX_INT: Final = (1 << 63) - 1
_MAX_LIST: Final = 4096  # messages, stop strings, versions: far beyond any real request


class Code:
    """Stable error codes carried by ``error`` frames (docs/protocol.md lists what each means)."""

    BAD_FRAME: Final = "bad_frame"
    FRAME_TOO_LARGE: Final = "frame_too_large"
    BAD_STREAM: Final = "bad_stream"
    UNSUPPORTED_VERSION: Final = "unsupported_version"
    UNAUTHORIZED: Final = "unauthorized"
    BAD_REQUEST: Final = "bad_request"
    PROMPT_TOO_LONG: Final = "prompt_too_long"
    TOO_MANY_STREAMS: Final = "too_many_streams"
    OVERLOADED: Final = "overloaded"
    TIMEOUT: Final = "timeout"
    UPSTREAM_ERROR: Final = "upstream_error"
    UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
    SHUTTING_DOWN: Final = "shutting_down"
    INTERNAL: Final = "internal"
    REJECTED: Final = "rejected"
    TOO_MANY_CONNECTIONS: Final = "too_many_connections"  # added within version 2: a per-address limit
    RATE_LIMITED: Final = "rate_limited"  # added within version 2: frames per second over the limit


ERROR_CODES: Final = frozenset(
    value for name, value in vars(Code).items() if name.isupper() and isinstance(value, str)
)

# Codes that end only the stream they arrive on; every other code on stream 0 ends the connection.
STREAM_CODES: Final = frozenset(
    {
        Code.BAD_REQUEST,
        Code.PROMPT_TOO_LONG,
        Code.TOO_MANY_STREAMS,
        Code.OVERLOADED,
        Code.UPSTREAM_ERROR,
        Code.UPSTREAM_UNAVAILABLE,
        Code.INTERNAL,
        Code.REJECTED,
    }
)


class ProtocolError(PydiscoError):
    """A frame or a sequence of frames broke the protocol. ``code`` is one of :class:`Code`."""

    def __init__(self, message: str, *, code: str = Code.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


# -- frames -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """Client, stream 0, first frame: the protocol versions it speaks."""

    versions: tuple[int, ...]
    agent: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """Server's answer to hello: the chosen version and the limits of this connection."""

    version: int
    model: str
    max_frame_size: int
    max_streams: int
    heartbeat_interval: float
    agent: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Auth:
    """Client, stream 0, after hello: a bearer token. ``None`` when the frame carried no string
    token: the server refuses that like a wrong token (``unauthorized``), not as a bad frame."""

    token: str | None = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class AuthOk:
    """Server: the token was accepted; generate frames may follow."""


@dataclasses.dataclass(frozen=True, slots=True)
class Generate:
    """Client, on a new odd stream id: one answer to generate. ``reading_rate``: the tokens/s
    its reader takes them at, when the client knows (a scheduling server's input)."""

    request: GenerationRequest
    reading_rate: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """Server: one token of an answer. Times are the server's monotonic clock, in ns."""

    piece: TokenPiece
    generated_ns: int = 0
    sent_ns: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    """Server (version 3): consecutive tokens of one answer, ready at once, in one frame.
    ``pieces`` have consecutive positions; ``generated_ns[i]`` is when the backend produced
    ``pieces[i]``; ``sent_ns`` when the frame was handed to the transport."""

    pieces: tuple[TokenPiece, ...]
    generated_ns: tuple[int, ...]
    sent_ns: int = 0

    def __post_init__(self) -> None:
        if not self.pieces or len(self.pieces) != len(self.generated_ns):
            raise ValueError("a tokens frame needs one or more pieces and one generated_ns per piece")
        first = self.pieces[0].position
        if any(p.position != first + i for i, p in enumerate(self.pieces)):
            raise ValueError("a tokens frame's pieces must have consecutive positions")


@dataclasses.dataclass(frozen=True, slots=True)
class Done:
    """Server: the answer on this stream ended; ``result`` carries the usage."""

    result: GenerationResult
    sent_ns: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """Client: stop generating on this stream."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReaderReport:
    """Client, on an answer's stream (version 2): its reader has ``buffered_tokens`` tokens
    unread and takes them at ``reading_rate_tps``, having received every token before position
    ``received``. Sent when that departs from what the server would infer, not per token."""

    buffered_tokens: int
    reading_rate_tps: float
    received: int


@dataclasses.dataclass(frozen=True, slots=True)
class Paused:
    """Server, on an answer's stream (version 2): generation of this answer is paused for
    others (a step scheduler preempted it); its tokens resume later on the same stream."""


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    """Server: on stream 0 the connection is closing; on another stream that answer failed."""

    code: str
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    """Either side: answer with a pong carrying the same nonce."""

    nonce: int


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


Frame = Union[Hello, Welcome, Auth, AuthOk, Generate, Token, Tokens, Done, Cancel, ReaderReport, Paused, Error, Ping, Pong]


# -- encoding -----------------------------------------------------------------------------


def encode(frame: Frame) -> bytes:
    """The msgpack bytes of ``frame``."""
    data: bytes = msgpack.packb(_to_wire(frame), use_bin_type=True)
    return data


def _to_wire(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Token):
        p = frame.piece
        return {"t": "token", "pos": p.position, "id": p.token_id, "text": p.text,
                "tg": frame.generated_ns, "ts": frame.sent_ns}  # fmt: skip
    if isinstance(frame, Tokens):
        return {"t": "tokens", "pos": frame.pieces[0].position, "ids": [p.token_id for p in frame.pieces],
                "text": [p.text for p in frame.pieces], "tg": list(frame.generated_ns), "ts": frame.sent_ns}  # fmt: skip
    if isinstance(frame, Done):
        r = frame.result
        return {"t": "done", "finish": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "prefilled": r.prefilled_tokens, "generated": r.generated_tokens,
                "cost": float(r.cost_units), "ts": frame.sent_ns}  # fmt: skip
    if isinstance(frame, Generate):
        wire = _request_to_wire(frame.request)
        if frame.reading_rate is not None:
            wire["rate"] = float(frame.reading_rate)
        return wire
    if isinstance(frame, ReaderReport):
        return {"t": "reader_report", "buffered": frame.buffered_tokens, "rate": float(frame.reading_rate_tps),
                "pos": frame.received}  # fmt: skip
    if isinstance(frame, Hello):
        return {"t": "hello", "v": list(frame.versions), "agent": frame.agent}
    if isinstance(frame, Welcome):
        return {"t": "welcome", "v": frame.version, "model": frame.model,
                "max_frame": frame.max_frame_size, "max_streams": frame.max_streams,
                "hb": float(frame.heartbeat_interval), "agent": frame.agent}  # fmt: skip
    if isinstance(frame, Auth):
        return {"t": "auth", "token": frame.token}
    if isinstance(frame, AuthOk):
        return {"t": "auth_ok"}
    if isinstance(frame, Cancel):
        return {"t": "cancel"}
    if isinstance(frame, Paused):
        return {"t": "paused"}
    if isinstance(frame, Error):
        return {"t": "error", "code": frame.code, "msg": frame.message}
    if isinstance(frame, Ping):
        return {"t": "ping", "n": frame.nonce}
    if isinstance(frame, Pong):
        return {"t": "pong", "n": frame.nonce}
    raise TypeError(f"not a frame: {frame!r}")


def _request_to_wire(r: GenerationRequest) -> dict[str, Any]:
    wire: dict[str, Any] = {"t": "generate", "id": r.request_id, "max_tokens": r.max_tokens}
    if r.messages is not None:
        wire["messages"] = [{"role": m["role"], "content": m["content"]} for m in r.messages]
    else:
        wire["prompt"] = r.prompt
    s = r.sampling
    wire["sampling"] = {"temperature": float(s.temperature), "top_p": float(s.top_p),
                        "top_k": s.top_k, "seed": s.seed}  # fmt: skip
    if r.stop:
        wire["stop"] = list(r.stop)
    if r.resume_token_ids:
        wire["resume_ids"] = list(r.resume_token_ids)
    if r.resume_text is not None:
        wire["resume_text"] = r.resume_text
    if r.resume_position is not None:
        wire["resume_pos"] = r.resume_position
    return wire


# -- decoding -----------------------------------------------------------------------------


def decode(data: bytes, *, max_frame_size: int | None = None) -> Frame:
    """Parse and validate one frame. Raises only :class:`ProtocolError`.

    Unknown keys are ignored (a newer peer may add optional fields within a version); a missing
    required field or a field of the wrong type is ``bad_frame``; well-typed values that make no
    sense for a request (``max_tokens=0``) are ``bad_request``.
    """
    if max_frame_size is not None and len(data) > max_frame_size:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the limit of {max_frame_size}",
                            code=Code.FRAME_TOO_LARGE)  # fmt: skip
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(f"not a msgpack frame: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame is a msgpack map, got {type(obj).__name__}")
    kind = obj.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(f"unknown frame type {kind!r}")
    try:
        return parser(obj)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError) as e:  # a record's own checks (Sampling, ...)
        raise ProtocolError(f"invalid {kind} frame: {e}", code=Code.BAD_REQUEST) from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension types are not used (got type {code})")


def _field(obj: Mapping[str, Any], key: str, kind: str) -> ProtocolError:
    return ProtocolError(f"{obj.get('t')} frame: field {key!r} must be {kind}, got {obj.get(key)!r:.80}")


def _int(obj: Mapping[str, Any], key: str, lo: int = 0, hi: int = _MAX_INT, default: int | None = None) -> int:
    v = obj.get(key, default)
    if type(v) is not int or not lo <= v <= hi:  # bool is an int subclass: refused on purpose
        raise _field(obj, key, f"an integer in [{lo}, {hi}]")
    return v


def _opt_int(obj: Mapping[str, Any], key: str, lo: int = 0, hi: int = _MAX_INT) -> int | None:
    return None if obj.get(key) is None else _int(obj, key, lo, hi)


def _float(obj: Mapping[str, Any], key: str, default: float | None = None) -> float:
    v = obj.get(key, default)
    if type(v) not in (int, float) or not math.isfinite(v):
        raise _field(obj, key, "a finite number")
    return float(v)


def _str(obj: Mapping[str, Any], key: str, default: str | None = None) -> str:
    v = obj.get(key, default)
    if not isinstance(v, str):
        raise _field(obj, key, "a string")
    return v


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key)


def _list(obj: Mapping[str, Any], key: str, default: list[Any] | None = None) -> list[Any]:
    v = obj.get(key, default)
    if not isinstance(v, list) or len(v) > _MAX_LIST:
        raise _field(obj, key, f"a list of at most {_MAX_LIST} items")
    return v


def _parse_hello(o: dict[str, Any]) -> Hello:
    versions = _list(o, "v")
    if not versions or not all(type(v) is int and 0 < v <= 0xFFFF for v in versions):
        raise _field(o, "v", "a non-empty list of version numbers")
    return Hello(tuple(versions), _str(o, "agent", ""))


def _parse_welcome(o: dict[str, Any]) -> Welcome:
    return Welcome(
        version=_int(o, "v", 1, 0xFFFF),
        model=_str(o, "model", ""),
        max_frame_size=_int(o, "max_frame", 64),
        max_streams=_int(o, "max_streams", 1, MAX_STREAM_ID),
        heartbeat_interval=_float(o, "hb", 0.0),
        agent=_str(o, "agent", ""),
    )


def _parse_generate(o: dict[str, Any]) -> Generate:
    messages: list[Message] | None = None
    if o.get("messages") is not None:
        messages = []
        for m in _list(o, "messages"):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _field(o, "messages", "a list of {role: str, content: str} maps")
            messages.append({"role": m["role"], "content": m["content"]})
    s = o.get("sampling", {})
    if not isinstance(s, dict):
        raise _field(o, "sampling", "a map")
    sampling = Sampling(
        temperature=_float(s, "temperature", 0.0),
        top_p=_float(s, "top_p", 1.0),
        top_k=_int(s, "top_k", 0, 1 << 31, default=40),
        seed=_int(s, "seed", 0, _MAX_INT, default=0),
    )
    stop = _list(o, "stop", [])
    if not all(isinstance(x, str) for x in stop):
        raise _field(o, "stop", "a list of strings")
    resume_ids = _list(o, "resume_ids", [])
    if not all(type(x) is int and 0 <= x <= _MAX_U31 for x in resume_ids):
        raise _field(o, "resume_ids", "a list of token ids")
    request = GenerationRequest(
        messages=messages,
        prompt=_opt_str(o, "prompt"),
        max_tokens=_int(o, "max_tokens", 0, _MAX_U31),  # 0 passes here, fails as bad_request
        sampling=sampling,
        stop=tuple(stop),
        resume_token_ids=tuple(resume_ids),
        resume_text=_opt_str(o, "resume_text"),
        resume_position=_opt_int(o, "resume_pos", 0, _MAX_U31),
        request_id=_str(o, "id", ""),
    )
    rate = None if o.get("rate") is None else _float(o, "rate")
    if rate is not None and not rate > 0:
        raise ProtocolError(f"generate frame: a reading rate must be > 0, got {rate!r}", code=Code.BAD_REQUEST)
    return Generate(request, rate)


def _parse_reader_report(o: dict[str, Any]) -> ReaderReport:
    rate = _float(o, "rate")
    if not rate > 0:  # a report is no request: a nonsensical one is a broken peer
        raise _field(o, "rate", "a finite number > 0")
    return ReaderReport(_int(o, "buffered", 0, _MAX_U31), rate, _int(o, "pos", 0, _MAX_U31))


def _parse_token(o: dict[str, Any]) -> Token:
    piece = TokenPiece(_int(o, "pos", 0, _MAX_U31), _int(o, "id", -1, _MAX_U31), _str(o, "text"))
    return Token(piece, _int(o, "tg", default=0), _int(o, "ts", default=0))


def _parse_tokens(o: dict[str, Any]) -> Tokens:
    ids, texts, tg = _list(o, "ids"), _list(o, "text"), _list(o, "tg")
    n = len(ids)
    if n == 0 or len(texts) != n or len(tg) != n:
        raise ProtocolError(f"tokens frame: ids, text and tg must be lists of one equal, non-zero length, "
                            f"got {n}, {len(texts)} and {len(tg)}")  # fmt: skip
    pos = _int(o, "pos", 0, _MAX_U31 - n + 1)
    if not all(type(x) is int and -1 <= x <= _MAX_U31 for x in ids):
        raise _field(o, "ids", "a list of token ids (-1 for none)")
    if not all(isinstance(x, str) for x in texts):
        raise _field(o, "text", "a list of strings")
    if not all(type(x) is int and 0 <= x <= _MAX_INT for x in tg):
        raise _field(o, "tg", "a list of clock readings (ns)")
    pieces = tuple(TokenPiece(pos + i, ids[i], texts[i]) for i in range(n))
    return Tokens(pieces, tuple(tg), _int(o, "ts", default=0))


def _parse_done(o: dict[str, Any]) -> Done:
    finish = _str(o, "finish")
    if not finish:
        raise _field(o, "finish", "a non-empty string")
    result = GenerationResult(
        finish_reason=finish,
        prompt_tokens=_int(o, "prompt_tokens", default=0),
        prefilled_tokens=_int(o, "prefilled", default=0),
        generated_tokens=_int(o, "generated", default=0),
        cost_units=_float(o, "cost", 0.0),
    )
    return Done(result, _int(o, "ts", default=0))


def _parse_error(o: dict[str, Any]) -> Error:
    code = _str(o, "code")
    if not code:
        raise _field(o, "code", "a non-empty string")
    return Error(code, _str(o, "msg", ""))


_PARSERS: Final[dict[str, Callable[[dict[str, Any]], Frame]]] = {
    "hello": _parse_hello,
    "welcome": _parse_welcome,
    "auth": lambda o: Auth(o["token"] if isinstance(o.get("token"), str) else None),
    "auth_ok": lambda o: AuthOk(),
    "generate": _parse_generate,
    "token": _parse_token,
    "tokens": _parse_tokens,
    "done": _parse_done,
    "cancel": lambda o: Cancel(),
    "reader_report": _parse_reader_report,
    "paused": lambda o: Paused(),
    "error": _parse_error,
    "ping": lambda o: Ping(_int(o, "n")),
    "pong": lambda o: Pong(_int(o, "n")),
}


# -- the server's side of one connection --------------------------------------------------


REORDER_WINDOW_PER_STREAM: Final = 4
"""The server remembers this many used stream ids per allowed concurrent stream above its floor
(see :class:`UsedStreamIds`)."""


class UsedStreamIds:
    """Which odd client stream ids a connection has used, so that none is used twice, while ids
    may arrive in any order (QUIC orders data within a stream, not across streams).

    Memory is bounded: every odd id up to ``floor`` counts as used, and only the used ids above
    it are kept. The floor moves up over ids used without a gap below them and, once more than
    ``window`` ids are kept, up to the smallest kept one: an id still missing below it then
    counts as used, because that many later ids overtook it.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self.window = window
        self.floor = -1  # no id used yet (the first is 1)
        self._above: set[int] = set()

    def __len__(self) -> int:
        return len(self._above)

    def claim(self, sid: int) -> bool:
        """Mark the odd id ``sid`` used; False if it was used (or counts as used) already."""
        if sid <= self.floor or sid in self._above:
            return False
        self._above.add(sid)
        while True:
            if self.floor + 2 in self._above:
                self._above.discard(self.floor + 2)
                self.floor += 2
            elif len(self._above) > self.window:
                self.floor = min(self._above)
                self._above.discard(self.floor)
            else:
                return True


class ServerState(enum.IntEnum):
    """Ordered: ``state >= READY`` means authenticated, ``CLOSED`` is final."""

    AWAIT_HELLO = 0
    AWAIT_AUTH = 1
    READY = 2
    CLOSED = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Output: send ``data`` on ``stream_id``."""

    stream_id: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class StartStream:
    """Output (server): run ``request``; its frames go on ``stream_id``. ``reading_rate``: the
    client's reader's rate, if the generate frame gave one."""

    stream_id: int
    request: GenerationRequest
    reading_rate: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CancelStream:
    """Output (server): the client cancelled the answer on ``stream_id``."""

    stream_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReaderReported:
    """Output (server): the client reported its reader's state for the answer on ``stream_id``."""

    stream_id: int
    report: ReaderReport


@dataclasses.dataclass(frozen=True, slots=True)
class CloseConnection:
    """Output: the connection must close (after sending what came before). ``code`` says why."""

    code: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Authenticated:
    """Output (server): the client's token was accepted."""


ServerOutput = Union[Send, StartStream, CancelStream, ReaderReported, CloseConnection, Authenticated]


class ServerProtocol:
    """The server end of one connection: hello, auth before anything else, stream bookkeeping.

    Feed every received frame to :meth:`receive`; it returns what to do, in order. Produce
    outgoing stream frames with :meth:`token`, :meth:`paused`, :meth:`done` and :meth:`stream_error`, which
    drop frames for streams that are no longer open (the client cancelled them).
    """

    def __init__(
        self,
        *,
        check_token: Callable[[str], bool],
        model: str,
        max_frame_size: int,
        max_streams: int,
        heartbeat_interval: float,
        versions: Iterable[int] = PROTOCOL_VERSIONS,
        agent: str = "",
    ) -> None:
        self._check_token = check_token
        self._versions = frozenset(versions)
        self._welcome = Welcome(0, model, max_frame_size, max_streams, heartbeat_interval, agent)
        self.max_frame_size = max_frame_size
        self.max_streams = max_streams
        self.state = ServerState.AWAIT_HELLO
        self.version = 0
        self.open_streams: set[int] = set()  # started and not yet ended by done/error
        self._cancelling: set[int] = set()  # cancelled by the client: only done/error may follow
        self.stream_ids = UsedStreamIds(REORDER_WINDOW_PER_STREAM * max_streams)
        self._ping_nonce = 0

    # Incoming ----------------------------------------------------------------------------

    def receive(self, stream_id: int, data: bytes) -> list[ServerOutput]:
        """Process one received frame. Never raises for anything the peer sent."""
        if self.state is ServerState.CLOSED:
            return []
        try:
            frame = decode(data, max_frame_size=self.max_frame_size)
        except ProtocolError as e:
            if e.code != Code.BAD_REQUEST:  # malformed: the peer is broken, stop talking to it
                return self.fail(e.code, str(e))
            # Only a generate frame can be well-formed yet unusable.
            if self.state is not ServerState.READY:
                return self.fail(Code.UNAUTHORIZED, "authenticate (auth frame) before generating")
            return self._refuse_stream(stream_id, e.code, str(e))
        return self._handle(stream_id, frame)

    def frame_too_large(self, size: int | None = None) -> list[ServerOutput]:
        """The transport refused an oversized frame: answer as for any malformed frame."""
        what = f"a frame of {size} bytes" if size is not None else "a frame"
        return self.fail(Code.FRAME_TOO_LARGE, f"{what} exceeds the limit of {self.max_frame_size} bytes")

    def fail(self, code: str, message: str) -> list[ServerOutput]:
        """Close the connection with a connection-level error frame."""
        if self.state is ServerState.CLOSED:
            return []
        self.state = ServerState.CLOSED
        self.open_streams.clear()
        self._cancelling.clear()
        return [Send(CONNECTION_STREAM, encode(Error(code, message))), CloseConnection(code, message)]

    def _handle(self, sid: int, frame: Frame) -> list[ServerOutput]:
        if isinstance(frame, (Hello, Auth, Ping, Pong)) and sid != CONNECTION_STREAM:
            return self.fail(Code.BAD_STREAM, f"{type(frame).__name__.lower()} belongs on stream 0, got {sid}")
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        if self.state is ServerState.AWAIT_HELLO:
            return self.fail(Code.BAD_FRAME, f"the first frame must be hello, got {type(frame).__name__.lower()}")
        if isinstance(frame, Ping):
            return [Send(CONNECTION_STREAM, encode(Pong(frame.nonce)))]
        if isinstance(frame, Pong):
            return []
        if isinstance(frame, Auth):
            return self._on_auth(frame)
        if isinstance(frame, (Generate, Cancel, ReaderReport)) and self.state is not ServerState.READY:
            return self.fail(Code.UNAUTHORIZED, "authenticate (auth frame) before generating")
        if isinstance(frame, Generate):
            return self._on_generate(sid, frame)
        if isinstance(frame, ReaderReport):
            return self._on_reader_report(sid, frame)
        if isinstance(frame, Cancel):
            if sid in self.open_streams and sid not in self._cancelling:
                self._cancelling.add(sid)
                return [CancelStream(sid)]
            return []  # raced with the end of the stream, or a repeat: nothing left to cancel
        return self.fail(Code.BAD_FRAME, f"a client does not send {type(frame).__name__.lower()} frames")

    def _on_hello(self, frame: Hello) -> list[ServerOutput]:
        if self.state is not ServerState.AWAIT_HELLO:
            return self.fail(Code.BAD_FRAME, "hello was already received")
        common = self._versions.intersection(frame.versions)
        if not common:
            return self.fail(
                Code.UNSUPPORTED_VERSION,
                f"no common protocol version: client speaks {sorted(frame.versions)}, "
                f"server speaks {sorted(self._versions)}",
            )
        self.version = max(common)
        self.state = ServerState.AWAIT_AUTH
        welcome = dataclasses.replace(self._welcome, version=self.version)
        return [Send(CONNECTION_STREAM, encode(welcome))]

    def _on_auth(self, frame: Auth) -> list[ServerOutput]:
        if self.state is not ServerState.AWAIT_AUTH:
            return self.fail(Code.BAD_FRAME, "already authenticated")
        if frame.token is None or not self._check_token(frame.token):
            return self.fail(Code.UNAUTHORIZED, "the bearer token was not accepted")
        self.state = ServerState.READY
        return [Send(CONNECTION_STREAM, encode(AuthOk())), Authenticated()]

    def _claim_stream(self, sid: int) -> str | None:
        """Why ``sid`` cannot open a stream, or None after marking it used."""
        if sid % 2 != 1 or sid > MAX_STREAM_ID:
            return f"generate needs an odd client stream id below 2**31, got {sid}"
        if not self.stream_ids.claim(sid):
            return f"stream id {sid} was used before on this connection"
        return None

    def _on_reader_report(self, sid: int, frame: ReaderReport) -> list[ServerOutput]:
        if self.version < READER_REPORT_VERSION:
            return self.fail(Code.BAD_FRAME, f"reader_report needs protocol version {READER_REPORT_VERSION}; "
                                             f"this connection speaks {self.version}")  # fmt: skip
        if sid == CONNECTION_STREAM:
            return self.fail(Code.BAD_STREAM, "reader_report belongs on an answer's stream, got stream 0")
        if sid in self.open_streams and sid not in self._cancelling:
            return [ReaderReported(sid, frame)]
        return []  # raced with the end of the stream: nothing left to schedule

    def _on_generate(self, sid: int, frame: Generate) -> list[ServerOutput]:
        request = frame.request
        refusal = self._claim_stream(sid)
        if refusal is not None:
            return self.fail(Code.BAD_STREAM, refusal)
        if len(self.open_streams) >= self.max_streams:
            return [Send(sid, encode(Error(Code.TOO_MANY_STREAMS,
                                           f"at most {self.max_streams} concurrent streams per connection")))]  # fmt: skip
        self.open_streams.add(sid)
        return [StartStream(sid, request, frame.reading_rate)]

    def _refuse_stream(self, sid: int, code: str, message: str) -> list[ServerOutput]:
        """A well-formed but unusable generate: refuse that stream, keep the connection."""
        refusal = self._claim_stream(sid)
        if refusal is not None:
            return self.fail(Code.BAD_STREAM, refusal)
        return [Send(sid, encode(Error(code, message)))]

    # Outgoing ----------------------------------------------------------------------------

    def token(self, sid: int, piece: TokenPiece, generated_ns: int, sent_ns: int) -> bytes | None:
        """The token frame for ``sid``, or None if that stream is closed or being cancelled."""
        if sid not in self.open_streams or sid in self._cancelling:
            return None
        return encode(Token(piece, generated_ns, sent_ns))

    def tokens(self, sid: int, pieces: Sequence[TokenPiece], generated_ns: Sequence[int], sent_ns: int) -> list[bytes]:
        """The frames for ``pieces``, consecutive tokens of ``sid`` ready at once: on a version 3
        connection ``tokens`` frames of up to :data:`MAX_BATCH_TOKENS` tokens and an eighth of
        the frame limit in text (a lone token stays a ``token`` frame), before that one
        ``token`` frame each; none if the stream is closed or being cancelled."""
        if sid not in self.open_streams or sid in self._cancelling or not pieces:
            return []
        if self.version < TOKENS_VERSION:
            return [encode(Token(p, g, sent_ns)) for p, g in zip(pieces, generated_ns, strict=True)]
        out = []
        budget = max(1, self.max_frame_size // 8)  # text characters per frame: UTF-8 and framing fit
        start, n = 0, len(pieces)
        while start < n:
            end, chars = start + 1, len(pieces[start].text)
            while (end < n and end - start < MAX_BATCH_TOKENS and chars + len(pieces[end].text) <= budget
                   and pieces[end].position == pieces[end - 1].position + 1):  # fmt: skip
                chars += len(pieces[end].text)
                end += 1
            if end - start == 1:
                out.append(encode(Token(pieces[start], generated_ns[start], sent_ns)))
            else:
                out.append(encode(Tokens(tuple(pieces[start:end]), tuple(generated_ns[start:end]), sent_ns)))
            start = end
        return out

    def done(self, sid: int, result: GenerationResult, sent_ns: int) -> bytes | None:
        """The done frame that ends ``sid`` (for a cancelled stream, its acknowledgement), or
        None if it is closed already."""
        if not self._end(sid):
            return None
        return encode(Done(result, sent_ns))

    def stream_error(self, sid: int, code: str, message: str) -> bytes | None:
        """The error frame that ends ``sid``, or None if it is closed already."""
        if not self._end(sid):
            return None
        return encode(Error(code, message))

    def paused(self, sid: int) -> bytes | None:
        """The ``paused`` frame for ``sid``, or None if that stream is closed or being
        cancelled, or the client predates the frame (version 1)."""
        if sid not in self.open_streams or sid in self._cancelling or self.version < READER_REPORT_VERSION:
            return None
        return encode(Paused())

    def is_cancelling(self, sid: int) -> bool:
        return sid in self._cancelling

    def _end(self, sid: int) -> bool:
        if sid not in self.open_streams:
            return False
        self.open_streams.discard(sid)
        self._cancelling.discard(sid)
        return True

    def ping(self) -> bytes:
        self._ping_nonce += 1
        return encode(Ping(self._ping_nonce))


# -- the client's side of one connection --------------------------------------------------


class ClientState(enum.IntEnum):
    HANDSHAKE = 0
    READY = 1
    CLOSED = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """Output (client): hello and auth were accepted."""

    welcome: Welcome


@dataclasses.dataclass(frozen=True, slots=True)
class TokenReceived:
    stream_id: int
    piece: TokenPiece
    generated_ns: int
    sent_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamPaused:
    """Output (client): the server paused the answer on ``stream_id`` (it resumes later)."""

    stream_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamDone:
    stream_id: int
    result: GenerationResult


@dataclasses.dataclass(frozen=True, slots=True)
class PongReceived:
    """Output (client): the server answered the ping with this nonce (see ``ClientProtocol.ping``)."""

    nonce: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamFailed:
    stream_id: int
    code: str
    message: str


ClientOutput = Union[Send, Ready, TokenReceived, StreamPaused, StreamDone, StreamFailed, PongReceived, CloseConnection]


@dataclasses.dataclass(slots=True)
class _ClientStream:
    next_position: int


class ClientProtocol:
    """The client end of one connection: handshake, stream ids, in-order token checks.

    Frames for streams the client no longer follows (cancelled, finished) are dropped: a
    cancel crosses tokens already in flight.
    """

    def __init__(self, *, token: str, versions: Iterable[int] = PROTOCOL_VERSIONS, agent: str = "",
                 max_frame_size: int | None = None) -> None:  # fmt: skip
        self._token = token
        self._versions = tuple(versions)
        self._agent = agent
        self.max_frame_size = max_frame_size
        self.state = ClientState.HANDSHAKE
        self.welcome: Welcome | None = None
        self._streams: dict[int, _ClientStream] = {}
        self._next_stream_id = 1
        self._ping_nonce = 0

    def handshake(self) -> list[bytes]:
        """hello and auth, to send on stream 0 back to back (auth needs no reply to hello)."""
        return [encode(Hello(self._versions, self._agent)), encode(Auth(self._token))]

    def open_stream(self, request: GenerationRequest, reading_rate: float | None = None) -> tuple[int, bytes]:
        """Allocate the next stream id and encode ``request`` for it (with the reader's rate,
        when given)."""
        if self.state is not ClientState.READY:
            raise ProtocolError("the connection is not ready", code=Code.BAD_STREAM)
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise ProtocolError("this connection ran out of stream ids", code=Code.BAD_STREAM)
        data = encode(Generate(request, reading_rate))
        limit = self.welcome.max_frame_size if self.welcome is not None else None
        if limit is not None and len(data) > limit:
            raise ProtocolError(f"the request encodes to {len(data)} bytes; the server accepts at most {limit}",
                                code=Code.FRAME_TOO_LARGE)  # fmt: skip
        self._next_stream_id += 2
        self._streams[sid] = _ClientStream(request.start_position)
        return sid, data

    def forget(self, sid: int) -> bytes | None:
        """Stop following ``sid``; returns the cancel frame if the stream was still open."""
        if self._streams.pop(sid, None) is None:
            return None
        return encode(Cancel())

    @property
    def reports_readers(self) -> bool:
        """The server understands ``reader_report`` (the connection speaks version 2 or later)."""
        return self.welcome is not None and self.welcome.version >= READER_REPORT_VERSION

    @property
    def batches_tokens(self) -> bool:
        """The server may send ``tokens`` frames (the connection speaks version 3 or later)."""
        return self.welcome is not None and self.welcome.version >= TOKENS_VERSION

    def reader_report(self, sid: int, buffered_tokens: int, reading_rate_tps: float) -> bytes | None:
        """The ``reader_report`` frame for ``sid`` (``received`` is where its tokens have got to),
        or None when the stream is no longer followed or the server predates the frame."""
        stream = self._streams.get(sid)
        if stream is None or not self.reports_readers:
            return None
        return encode(ReaderReport(buffered_tokens, reading_rate_tps, stream.next_position))

    def received(self, sid: int) -> int | None:
        """The position after the last token received on ``sid`` (None: not followed)."""
        stream = self._streams.get(sid)
        return None if stream is None else stream.next_position

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def ping(self) -> tuple[int, bytes]:
        """A ping frame for stream 0 and its nonce, which the server's pong carries back."""
        self._ping_nonce += 1
        return self._ping_nonce, encode(Ping(self._ping_nonce))

    def receive(self, sid: int, data: bytes) -> list[ClientOutput]:
        """Process one received frame. Never raises for anything the peer sent."""
        if self.state is ClientState.CLOSED:
            return []
        try:
            frame = decode(data, max_frame_size=self.max_frame_size)
            return self._handle(sid, frame)
        except ProtocolError as e:
            return self._close(Code.BAD_FRAME if e.code == Code.BAD_REQUEST else e.code, f"server sent {e}")

    def _close(self, code: str, message: str) -> list[ClientOutput]:
        self.state = ClientState.CLOSED
        self._streams.clear()
        return [CloseConnection(code, message)]

    def _handle(self, sid: int, frame: Frame) -> list[ClientOutput]:
        if sid == CONNECTION_STREAM:
            if isinstance(frame, Ping):
                return [Send(CONNECTION_STREAM, encode(Pong(frame.nonce)))]
            if isinstance(frame, Pong):
                return [PongReceived(frame.nonce)]
            if isinstance(frame, Error):
                return self._close(frame.code, frame.message)
            if isinstance(frame, Welcome) and self.state is ClientState.HANDSHAKE and self.welcome is None:
                if frame.version not in self._versions:
                    return self._close(Code.UNSUPPORTED_VERSION, f"server chose version {frame.version}")
                self.welcome = frame
                return []
            if isinstance(frame, AuthOk) and self.state is ClientState.HANDSHAKE and self.welcome is not None:
                self.state = ClientState.READY
                return [Ready(self.welcome)]
            raise ProtocolError(f"unexpected {type(frame).__name__.lower()} frame on stream 0")
        if self.state is not ClientState.READY:
            raise ProtocolError(f"stream frame on {sid} before the handshake finished")
        stream = self._streams.get(sid)
        if stream is None:
            if sid % 2 == 1 and sid < self._next_stream_id and isinstance(frame, (Token, Tokens, Paused, Done, Error)):
                return []  # late frames of a stream we stopped following
            raise ProtocolError(f"frame on stream {sid}, which this client never opened")
        if isinstance(frame, Token):
            if frame.piece.position != stream.next_position:
                raise ProtocolError(
                    f"stream {sid}: token at position {frame.piece.position}, expected {stream.next_position}"
                )
            stream.next_position += 1
            return [TokenReceived(sid, frame.piece, frame.generated_ns, frame.sent_ns)]
        if isinstance(frame, Tokens) and self.batches_tokens:
            first = frame.pieces[0].position
            if first != stream.next_position:
                raise ProtocolError(f"stream {sid}: tokens from position {first}, expected {stream.next_position}")
            stream.next_position += len(frame.pieces)
            return [TokenReceived(sid, p, g, frame.sent_ns) for p, g in zip(frame.pieces, frame.generated_ns)]
        if isinstance(frame, Paused) and self.reports_readers:
            return [StreamPaused(sid)]
        if isinstance(frame, Done):
            del self._streams[sid]
            return [StreamDone(sid, frame.result)]
        if isinstance(frame, Error):
            del self._streams[sid]
            return [StreamFailed(sid, frame.code, frame.message)]
        raise ProtocolError(f"unexpected {type(frame).__name__.lower()} frame on stream {sid}")
