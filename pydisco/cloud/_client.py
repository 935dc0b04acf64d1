"""The client side of the cloud: a :class:`CloudEndpoint` streams answers from a pydisco server.

One endpoint keeps one authenticated connection (a "link"), made on first use and made again
after it dropped. Each answer is one stream on it. A reader task per link dispatches frames to
the answers waiting for them and answers the server's pings; the endpoint's nursery (owned by
:func:`open_cloud_endpoint`) runs it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import ssl
import statistics as _stats
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Union

import trio

from .._errors import AuthenticationError, ConfigurationError, EndpointError, EndpointUnavailable
from .protocol import (
    CONNECTION_STREAM,
    ClientOutput,
    ClientProtocol,
    ClientState,
    CloseConnection,
    Code,
    PongReceived,
    ProtocolError,
    Ready,
    Send,
    StreamDone,
    StreamFailed,
    StreamPaused,
    TokenReceived,
    Welcome,
)
from .._percentiles import percentile
from .._types import GenerationRequest, GenerationResult, ReaderState, TokenPiece, TokenSink
from ._reports import ReportSchedule
from .._groups import single_exception
from ..observability._logging import ANSWER_ID, get_logger
from .. import transports as _transports


_CANCEL_SEND_TIMEOUT = 0.5  # a cancelled generate waits at most this long to tell the server
_RTT_GAIN = 1 / 8  # weight of a new round-trip sample in the smoothed estimate (RFC 6298's alpha)
_LINK_LOST_CODES = frozenset({Code.SHUTTING_DOWN, Code.TIMEOUT, Code.TOO_MANY_CONNECTIONS})
_REPORT_CHECK_S = 0.1  # how often an answer looks whether its reader is worth a report

log = get_logger("pydisco.cloud.client")


@dataclasses.dataclass(frozen=True)
class CloudStatistics:
    """What a :class:`CloudEndpoint` has seen. Times are seconds on the Trio clock."""

    connects: int  # links made (the first and every reconnect)
    connect_failures: int  # attempts that failed (unreachable, refused, handshake)
    links_lost: int  # links that dropped while answers were streaming on them
    requests: int  # generate calls
    completed: int  # answers that ended with done (stop or length)
    cancelled: int  # answers the caller cancelled
    failed: int  # answers that raised (server error, lost link, auth)
    tokens: int  # tokens delivered to sinks
    ttft_samples: tuple[float, ...]  # recent fresh (not resumed) answers: generate sent -> first token
    inter_token_samples: tuple[float, ...]  # recent gaps between consecutive tokens of an answer
    ttft_p50: float | None
    inter_token_p50: float | None
    inter_token_p99: float | None
    connected: bool  # a link is up now
    server_model: str | None  # model id the server announced on the last link
    rtt_s: float | None  # the last link's smoothed round trip (hello -> welcome, then pongs); None before one
    reader_reports: int  # reader_report frames sent (protocol version 2; docs/protocol.md)


@dataclasses.dataclass(frozen=True, slots=True)
class _LinkLost:
    error: EndpointError


@dataclasses.dataclass(frozen=True, slots=True)
class _SinkFailed:
    error: Exception


_End = Union[StreamDone, StreamFailed, _LinkLost, _SinkFailed]


class _Answer:
    """One answer in flight. The link's reader calls :meth:`token` itself (no task hop between
    the wire and the sink); the answer's own task waits only for how it ends."""

    def __init__(self, sink: TokenSink, fresh: bool, ttft: collections.deque[float],
                 gaps: collections.deque[float], counts: collections.Counter[str], request_id: str = "",
                 reports: ReportSchedule | None = None,
                 reader_state: Callable[[], ReaderState] | None = None) -> None:  # fmt: skip
        self.sink = sink
        self.reports = reports  # when its reader is worth reporting (None: it is not reported)
        self.reader_state = reader_state if reports is not None else None
        self.request_id = request_id  # the answer's id, for the link's log records
        self.fresh = fresh
        self.delivered = 0
        self.started = self.last = 0.0
        self._ttft, self._gaps, self._counts = ttft, gaps, counts
        self._end_in, self.end = trio.open_memory_channel[_End](1)
        self._ended = False

    def token(self, piece: TokenPiece) -> None:
        """Hand ``piece`` (its ``age_ns`` already set) to the sink."""
        if self._ended:
            return
        now = trio.current_time()
        if self.delivered == 0:
            if self.fresh:
                self._ttft.append(now - self.started)
        else:
            self._gaps.append(now - self.last)
        self.last = now
        self.delivered += 1
        if self.reports is not None:
            self.reports.received(now)
        self._counts["tokens"] += 1
        try:
            self.sink(piece)
        except Exception as e:  # the caller's bug: end this answer, not the link
            self.finish(_SinkFailed(e))

    def paused(self) -> None:
        """The server paused this answer for others: tell a sink that wants to know."""
        paused = getattr(self.sink, "paused", None)
        if self._ended or paused is None:
            return
        try:
            paused()
        except Exception as e:  # the caller's bug: end this answer, not the link
            self.finish(_SinkFailed(e))

    def finish(self, event: _End) -> None:
        if not self._ended:
            self._ended = True
            self._end_in.send_nowait(event)


class _Link:
    """One connected, authenticated connection and the streams open on it.

    ``rtt`` is the smoothed round trip, measured without a clock shared with the server: first
    from sending hello to receiving welcome, then from each ping to its pong.
    """

    def __init__(self, connection: _transports.FrameConnection, proto: ClientProtocol, welcome: Welcome,
                 rtt: float) -> None:  # fmt: skip
        self.connection = connection
        self.proto = proto
        self.welcome = welcome
        self.answers: dict[int, _Answer] = {}
        self.lost: EndpointError | None = None
        self.last_received = trio.current_time()
        self.rtt = rtt
        self._ping: tuple[int, float] | None = None  # the ping awaiting its pong: nonce, sent at
        self._send_lock = trio.Lock()
        self.reported = trio.Event()  # set while some answer on the link has a reader to report

    def one_way_ns(self) -> int:
        """Half the round trip, in ns: the estimate of how long a frame takes to arrive."""
        return int(self.rtt * 0.5e9)

    async def send_ping(self) -> None:
        nonce, data = self.proto.ping()
        self._ping = (nonce, trio.current_time())
        await self.send(CONNECTION_STREAM, data)

    def pong(self, nonce: int) -> None:
        if self._ping is not None and self._ping[0] == nonce:
            sample = trio.current_time() - self._ping[1]
            self._ping = None
            self.rtt += _RTT_GAIN * (sample - self.rtt)

    async def send(self, stream_id: int, data: bytes) -> None:
        async with self._send_lock:
            await self.connection.send_frame(stream_id, data)

    def fail(self, error: EndpointError) -> None:
        """Mark the link dead and tell every open answer."""
        if self.lost is None:
            self.lost = error
        self.reported.set()  # the reporter wakes and ends
        for answer in self.answers.values():
            answer.finish(_LinkLost(self.lost))
        self.answers.clear()


class CloudEndpoint:
    """An :class:`~pydisco._types.Endpoint` backed by a pydisco server.

    Errors from :meth:`generate`: :class:`EndpointUnavailable` when the server cannot be reached
    or the link drops mid-answer (tokens already given to the sink stay valid; resume from them),
    :class:`AuthenticationError` when the token is refused, :class:`EndpointError` with the
    server's code for an error frame.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        nursery: trio.Nursery,
        ssl_context: ssl.SSLContext | None = None,
        name: str | None = None,
        connect_timeout: float = 10.0,
        ping_after: float = 2.0,
        dead_after: float = 10.0,
        max_frame_size: int = _transports.DEFAULT_MAX_FRAME_SIZE,
        samples: int = 256,
    ) -> None:
        try:
            _transports.split_url(url)
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        if not 0 < ping_after < dead_after:
            raise ConfigurationError("need 0 < ping_after < dead_after")
        self._url = url
        self._token = token
        self._nursery = nursery
        self._ssl_context = ssl_context
        self._name = name or f"cloud:{url}"
        self._connect_timeout = connect_timeout
        self._ping_after = ping_after
        self._dead_after = dead_after
        self._max_frame_size = max_frame_size
        self._link: _Link | None = None
        self._link_lock = trio.Lock()
        self._closed = False
        self._ttft: collections.deque[float] = collections.deque(maxlen=samples)
        self._gaps: collections.deque[float] = collections.deque(maxlen=samples)
        self._counts = collections.Counter[str]()
        self._server_model: str | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._url

    # -- answers -----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        """Stream ``request`` from the server into ``sink``; return how it ended.

        Connects first if there is no live link. ``sink`` is called in the Trio thread by the
        link's reader task, as each token arrives; if it raises, the answer is cancelled on the
        server and the exception propagates from here. On cancellation a cancel frame is sent (waiting
        at most half a second for the link to take it) and trio.Cancelled propagates; the link
        stays up for the next answer.
        """
        if self._closed:
            raise trio.ClosedResourceError("this CloudEndpoint is closed")
        self._counts["requests"] += 1
        try:
            link = await self._ensure_link()
            return await self._stream(link, request, sink)
        except trio.Cancelled:
            self._counts["cancelled"] += 1
            raise
        except BaseException:
            self._counts["failed"] += 1
            raise

    async def _stream(self, link: _Link, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        reader_state = getattr(sink, "reader_state", None)  # the runtime's sinks tell (_types.TokenSink)
        state: ReaderState | None = reader_state() if reader_state is not None else None
        rate = state.reading_rate_tps if state is not None else None
        try:
            sid, data = link.proto.open_stream(request, rate)
        except ProtocolError as e:
            raise EndpointError(str(e), code=e.code) from None
        fresh = not request.resume_token_ids and request.resume_text is None
        reports = ReportSchedule(rate, request.start_position) if rate and link.proto.reports_readers else None
        answer = _Answer(sink, fresh, self._ttft, self._gaps, self._counts, request.request_id, reports,
                         reader_state)  # fmt: skip
        link.answers[sid] = answer
        if answer.reader_state is not None:
            link.reported.set()  # the link's reporter looks at it from now on
        finished = False
        try:
            answer.started = trio.current_time()
            try:
                await link.send(sid, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise self._lost(link, f"sending the request failed: {e}") from None
            end = await answer.end.receive()
            finished = not isinstance(end, _SinkFailed)
            if isinstance(end, StreamDone):
                self._counts["completed"] += 1
                return end.result
            if isinstance(end, StreamFailed):
                # shutting_down on a stream: a draining server refused a new answer; like a lost link.
                kind = EndpointUnavailable if end.code in _LINK_LOST_CODES else EndpointError
                raise kind(f"server error on {self._url}: {end.message}", code=end.code)
            if isinstance(end, _SinkFailed):
                raise end.error
            error = end.error
            raise type(error)(f"{error} (after {answer.delivered} tokens of this answer)", code=error.code)
        finally:
            link.answers.pop(sid, None)
            cancel = link.proto.forget(sid)
            if link.lost is None:
                # Shielded so a cancelled caller still tells the server, and bounded in time. The
                # stream is ended too: QUIC only grants new streams as old ones end both ways.
                with trio.CancelScope(shield=True), trio.move_on_after(_CANCEL_SEND_TIMEOUT):
                    try:
                        if cancel is not None and not finished:
                            await link.send(sid, cancel)
                        await link.connection.end_stream(sid)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

    async def _report(self, link: _Link) -> None:
        """The link's reporter: every ``_REPORT_CHECK_S`` it looks whether the reader of each
        answer streaming on it is worth a ``reader_report`` and sends those that are due. One
        task and one timer per link, not per answer; it sleeps while no answer has a reader to
        report."""
        ANSWER_ID.set(None)  # the link's, not the answer's that opened it
        while link.lost is None:
            await link.reported.wait()
            await trio.sleep(_REPORT_CHECK_S)
            now = trio.current_time()
            due: list[tuple[int, bytes]] = []
            reporting = False
            for sid, answer in list(link.answers.items()):
                reports, reader_state = answer.reports, answer.reader_state
                if reports is None or reader_state is None:
                    continue
                reporting = True
                received = link.proto.received(sid)
                report = reports.due(reader_state(), received, now) if received is not None else None
                data = link.proto.reader_report(sid, report.buffered, report.rate) if report is not None else None
                if data is not None:
                    due.append((sid, data))
            if not reporting:
                link.reported = trio.Event()  # wait for the next answer that has a reader to report
            for sid, data in due:
                try:
                    await link.send(sid, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the link's reader sees the loss too and ends the answers with it
                self._counts["reader_reports"] += 1

    # -- the link ------------------------------------------------------------------------------

    async def _ensure_link(self) -> _Link:
        async with self._link_lock:
            link = self._link
            if link is not None and link.lost is None:
                return link
            try:
                link = await self._connect()
            except BaseException as e:
                self._counts["connect_failures"] += 1
                if isinstance(e, Exception):
                    log.warning("cannot connect to %s: %s", self._url, e)
                raise
            self._counts["connects"] += 1
            again = self._counts["connects"] > 1
            log.info("%s %s (model %s)", "reconnected to" if again else "connected to", self._url, link.welcome.model)
            self._link = link
            self._nursery.start_soon(self._read, link)
            self._nursery.start_soon(self._watch, link)
            self._nursery.start_soon(self._report, link)
            return link

    async def _connect(self) -> _Link:
        where = self._url
        try:
            with trio.fail_after(self._connect_timeout):
                connection = await _transports.connect(
                    self._url, ssl_context=self._ssl_context, max_frame_size=self._max_frame_size
                )
                try:
                    return await self._handshake(connection)
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CANCEL_SEND_TIMEOUT):
                        await connection.aclose()
                    raise
        except _transports.UnknownTransportError as e:
            raise ConfigurationError(str(e)) from e
        except trio.TooSlowError:
            raise EndpointUnavailable(
                f"{where}: no connection within {self._connect_timeout:g} s", code=Code.TIMEOUT
            ) from None
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel, trio.ClosedResourceError) as e:
            code = e.code if isinstance(e, EndpointError) else "unavailable"  # the server's refusal keeps its code
            raise EndpointUnavailable(f"{where}: cannot connect: {e or type(e).__name__}", code=code) from e

    async def _handshake(self, connection: _transports.FrameConnection) -> _Link:
        proto = ClientProtocol(token=self._token, agent="pydisco-client")
        sent_at = trio.current_time()
        send_failed: trio.BrokenResourceError | None = None
        for data in proto.handshake():
            try:
                await connection.send_frame(CONNECTION_STREAM, data)
            except trio.BrokenResourceError as e:
                # A server refusing the connection (a limit, a drain) may have closed it before our
                # hello arrived: what it said is still to be read, and is the better error.
                send_failed = e
                break
        first_reply: float | None = None  # the welcome: the server answers hello at once
        while True:
            try:
                sid, data = await connection.receive_frame()
            except (trio.EndOfChannel, trio.BrokenResourceError) as e:
                if send_failed is not None:
                    raise send_failed from None
                if isinstance(e, trio.BrokenResourceError):
                    raise
                raise trio.BrokenResourceError("the server closed the connection during the handshake") from None
            if first_reply is None:
                first_reply = trio.current_time()
            for out in proto.receive(sid, data):
                if isinstance(out, Ready):
                    self._server_model = out.welcome.model
                    return _Link(connection, proto, out.welcome, rtt=first_reply - sent_at)
                if isinstance(out, Send):
                    await connection.send_frame(out.stream_id, out.data)
                elif isinstance(out, CloseConnection):
                    raise _close_error(self._url, out)

    async def _read(self, link: _Link) -> None:
        """The link's reader: frames to answers (tokens straight to their sinks), pings answered."""
        ANSWER_ID.set(None)  # this task serves every answer on the link, not the one that opened it
        proto, connection = link.proto, link.connection
        error: EndpointError | None = None
        try:
            while error is None:
                stream_id, data = await connection.receive_frame()
                link.last_received = trio.current_time()
                error = await self._dispatch(link, proto.receive(stream_id, data))
        except trio.EndOfChannel:
            error = EndpointUnavailable(f"{self._url}: the server closed the connection", code="unavailable")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            error = EndpointUnavailable(f"{self._url}: the link was lost: {e or type(e).__name__}", code="unavailable")
        except _transports.FrameTooLarge as e:
            error = EndpointError(f"{self._url}: {e}", code=Code.FRAME_TOO_LARGE)
        finally:
            if error is None:  # cancelled: the endpoint is closing
                error = EndpointUnavailable(f"{self._url}: the endpoint was closed", code="unavailable")
            self._drop(link, error)
            with trio.CancelScope(shield=True), trio.move_on_after(_CANCEL_SEND_TIMEOUT):
                await connection.aclose()

    async def _watch(self, link: _Link) -> None:
        """Pings a server that has gone quiet, and drops the link once it is silent too long.

        A separate task rather than a timeout around each receive: a cancel scope per frame
        costs more than the rest of the client's per-token work.
        """
        ANSWER_ID.set(None)  # the link's, not the answer's that opened it
        pinged_for = -math.inf  # the quiet spell already pinged about
        while link.lost is None:
            # Deadlines, not durations: woken at ping_at, `now - quiet_since` may round to just
            # under ping_after, and the loop would sleep until a deadline already past, forever.
            quiet_since = link.last_received
            ping_at, dead_at = quiet_since + self._ping_after, quiet_since + self._dead_after
            now = trio.current_time()
            if now >= dead_at:
                silence = now - quiet_since
                self._drop(link, EndpointUnavailable(f"{self._url}: the server sent nothing for {silence:.1f} s",
                                                     code=Code.TIMEOUT))  # fmt: skip
                with trio.CancelScope(shield=True), trio.move_on_after(_CANCEL_SEND_TIMEOUT):
                    await link.connection.aclose()  # ends the reader
                return
            if now >= ping_at and pinged_for != quiet_since:
                pinged_for = quiet_since
                try:
                    await link.send_ping()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the reader sees the same and reports it
            await trio.sleep_until(dead_at if pinged_for == quiet_since else ping_at)

    def _drop(self, link: _Link, error: EndpointError) -> None:
        if link.lost is None and link.answers:
            self._counts["links_lost"] += 1
            ids = sorted(a.request_id for a in link.answers.values())
            log.warning("link to %s lost with %d answers streaming: %s", self._url, len(ids), error,
                        extra={"answers": ids})  # fmt: skip
        elif link.lost is None and not self._closed:
            log.info("link to %s closed: %s", self._url, error)
        link.fail(error)

    async def _dispatch(self, link: _Link, outputs: list[ClientOutput]) -> EndpointError | None:
        for out in outputs:
            if isinstance(out, TokenReceived):
                answer = link.answers.get(out.stream_id)
                if answer is not None:
                    # Produced this long before it reached us: the server's own queueing (both
                    # times on its clock) plus the trip here (half the round trip).
                    age_ns = max(0, out.sent_ns - out.generated_ns) + link.one_way_ns()
                    p = out.piece  # a new piece directly: dataclasses.replace costs ~3x more per token
                    answer.token(TokenPiece(p.position, p.token_id, p.text, age_ns))
            elif isinstance(out, StreamPaused):
                answer = link.answers.get(out.stream_id)
                if answer is not None:
                    answer.paused()
            elif isinstance(out, (StreamDone, StreamFailed)):
                answer = link.answers.get(out.stream_id)
                if answer is not None:
                    answer.finish(out)
            elif isinstance(out, PongReceived):
                link.pong(out.nonce)
            elif isinstance(out, Send):
                await link.send(out.stream_id, out.data)
            elif isinstance(out, CloseConnection):
                return _close_error(self._url, out)
        return None

    # -- lifecycle and figures ---------------------------------------------------------------

    def _lost(self, link: _Link, why: str) -> EndpointUnavailable:
        error = EndpointUnavailable(f"{self._url}: {why}", code="unavailable")
        self._drop(link, error)
        return error

    async def aclose(self) -> None:
        """Close the link (answers still streaming get EndpointUnavailable). Idempotent."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            link.fail(EndpointUnavailable(f"{self._url}: the endpoint was closed", code="unavailable"))
            with trio.CancelScope(shield=True), trio.move_on_after(_CANCEL_SEND_TIMEOUT):
                await link.connection.aclose()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> CloudStatistics:
        ttft, gaps = tuple(self._ttft), tuple(self._gaps)
        c = self._counts
        link = self._link
        return CloudStatistics(
            connects=c["connects"],
            connect_failures=c["connect_failures"],
            links_lost=c["links_lost"],
            requests=c["requests"],
            completed=c["completed"],
            cancelled=c["cancelled"],
            failed=c["failed"],
            tokens=c["tokens"],
            ttft_samples=ttft,
            inter_token_samples=gaps,
            ttft_p50=_stats.median(ttft) if ttft else None,
            inter_token_p50=_stats.median(gaps) if gaps else None,
            inter_token_p99=percentile(gaps, 99) if gaps else None,
            connected=link is not None and link.lost is None and link.proto.state is ClientState.READY,
            server_model=self._server_model,
            rtt_s=link.rtt if link is not None else None,
            reader_reports=c["reader_reports"],
        )


def _close_error(url: str, close: CloseConnection) -> EndpointError:
    message = f"{url}: server closed the connection: {close.message} ({close.code})"
    if close.code == Code.UNAUTHORIZED:
        return AuthenticationError(message, code=close.code)
    if close.code in _LINK_LOST_CODES:
        return EndpointUnavailable(message, code=close.code)
    return EndpointError(message, code=close.code)


@asynccontextmanager
async def open_cloud_endpoint(
    url: str,
    *,
    token: str,
    ssl_context: ssl.SSLContext | None = None,
    name: str | None = None,
    connect_timeout: float = 10.0,
    ping_after: float = 2.0,
    dead_after: float = 10.0,
    max_frame_size: int = _transports.DEFAULT_MAX_FRAME_SIZE,
) -> AsyncIterator[CloudEndpoint]:
    """A :class:`CloudEndpoint` for ``url`` whose link tasks live inside this block.

    Does not connect yet (the first generate does). On exit the link is closed; an exception
    raised in the block comes out unchanged (never inside an ExceptionGroup).
    """
    endpoint: CloudEndpoint | None = None
    try:
        async with trio.open_nursery() as nursery:
            endpoint = CloudEndpoint(
                url,
                token=token,
                nursery=nursery,
                ssl_context=ssl_context,
                name=name,
                connect_timeout=connect_timeout,
                ping_after=ping_after,
                dead_after=dead_after,
                max_frame_size=max_frame_size,
            )
            try:
                yield endpoint
            finally:
                # Shielded: a cancelled block's close must not swap the body's error for
                # Cancelled (aclose is bounded in time on its own).
                with trio.CancelScope(shield=True):
                    await endpoint.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_exception(group) from None


