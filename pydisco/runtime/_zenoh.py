"""Publishing an answer on Zenoh, so a ROS 2 node on ``rmw_zenoh`` or any Zenoh client reads it
without pydisco code (docs/embedding.md, "Zenoh for ROS 2 users").

Two key expressions per answer, under a prefix the application picks (one per runtime, e.g.
``pydisco/arm-left``)::

    <prefix>/answers/<answer id>/tokens   one JSON message per released token, then an end message
    <prefix>/answers/<answer id>/report   the report, once the answer ended

Payloads are UTF-8 JSON (encoding ``application/json``): every Zenoh binding and ROS 2's own
tooling parse it without a schema, and a token is a few dozen bytes either way::

    {"answer_id": "a1b2", "end": false, "position": 3, "text": " sky", "token_id": 7296,
     "endpoint": "device", "released_s": 0.412}
    {"answer_id": "a1b2", "end": true, "finish_reason": "stop", "tokens": 57}

The publisher never blocks the answer: the reader hands each piece to a queue and a worker
thread encodes and puts it (reliable, congestion control ``BLOCK``, express), so a congested
Zenoh network holds up that thread, never the reader or the pacer behind it.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from .._errors import MissingExtraError
from .._groups import single_exception
from ._blocking import BlockingAnswer
from ._handover import AnswerFailed
from ._report import AnswerReport, Piece
from ._runtime import AnswerStream

if TYPE_CHECKING:
    import zenoh

TOKENS_SUFFIX = "tokens"
REPORT_SUFFIX = "report"


def answer_keys(key_prefix: str, answer_id: str) -> tuple[str, str]:
    """The tokens and report key expressions of one answer under ``key_prefix``."""
    prefix = key_prefix.strip("/")
    if not prefix or any(c in prefix for c in "*$?#") or "//" in prefix:
        raise ValueError(f"a Zenoh key prefix is chunks separated by '/', without * $ ? #: got {key_prefix!r}")
    if not answer_id or any(c in answer_id for c in "/*$?#"):
        raise ValueError(f"an answer id on Zenoh is one key chunk, without / * $ ? #: got {answer_id!r}")
    base = f"{prefix}/answers/{answer_id}"
    return f"{base}/{TOKENS_SUFFIX}", f"{base}/{REPORT_SUFFIX}"


def token_message(answer_id: str, piece: Piece) -> dict[str, Any]:
    return {
        "answer_id": answer_id,
        "end": False,
        "position": piece.position,
        "text": piece.text,
        "token_id": piece.token_id,
        "endpoint": piece.endpoint,
        "released_s": piece.released_s,
    }


def end_message(answer_id: str, report: AnswerReport) -> dict[str, Any]:
    return {"answer_id": answer_id, "end": True, "finish_reason": report.finish_reason, "tokens": report.tokens}


def _zenoh() -> Any:
    try:
        import zenoh
    except ImportError as e:
        raise MissingExtraError("publishing on Zenoh needs eclipse-zenoh", "zenoh") from e
    return zenoh


_DONE = object()


class ZenohAnswerPublisher:
    """One answer's publishers and the worker thread that puts on them. Create it with
    :func:`open_answer_publisher`; feed it from the answer's reader (Trio thread)."""

    def __init__(self, session: zenoh.Session, key_prefix: str, answer_id: str) -> None:
        self.answer_id = answer_id
        self.tokens_key, self.report_key = answer_keys(key_prefix, answer_id)
        self._zenoh = _zenoh()  # a missing extra is named here, not in the worker thread
        self._session = session
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()

    def token(self, piece: Piece) -> None:
        """Queue one released token; returns at once, whatever the network does."""
        self._queue.put((self.tokens_key, piece))

    def finish(self, report: AnswerReport) -> None:
        """Queue the end message and the report (call once the answer ended)."""
        self._queue.put((self.tokens_key, end_message(self.answer_id, report)))
        self._queue.put((self.report_key, report))

    def _encode(self, item: object) -> bytes:
        if isinstance(item, Piece):
            return json.dumps(token_message(self.answer_id, item)).encode()
        if isinstance(item, AnswerReport):
            return json.dumps({"answer_id": self.answer_id, **item.as_dict()}).encode()
        return json.dumps(item).encode()

    def _run(self) -> None:
        """The worker thread: declare, put every queued message in order, undeclare."""
        z = self._zenoh
        options = dict(
            encoding=z.Encoding.APPLICATION_JSON,
            congestion_control=z.CongestionControl.BLOCK,  # never drop a token; only this thread waits
            reliability=z.Reliability.RELIABLE,
            express=True,  # a token is worth sending alone: no batching delay
        )
        publishers = {key: self._session.declare_publisher(key, **options) for key in (self.tokens_key, self.report_key)}
        try:
            while (item := self._queue.get()) is not _DONE:
                assert isinstance(item, tuple)
                key, message = item
                publishers[key].put(self._encode(message))
        finally:
            for publisher in publishers.values():
                publisher.undeclare()  # type: ignore[no-untyped-call]  # unannotated in zenoh's stub


@asynccontextmanager
async def open_answer_publisher(
    session: zenoh.Session, key_prefix: str, answer_id: str
) -> AsyncIterator[ZenohAnswerPublisher]:
    """A publisher for one answer whose worker runs while the block does. Leaving the block
    waits until every queued message was put (the worker's puts are not abandoned, so on
    cancellation what was queued still goes out, then the block re-raises)."""
    publisher = ZenohAnswerPublisher(session, key_prefix, answer_id)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_worker, publisher)
            try:
                yield publisher
            finally:
                publisher._queue.put(_DONE)
    except BaseExceptionGroup as group:  # the worker's Zenoh error or the block's own, not a group
        raise single_exception(group) from None


async def _run_worker(publisher: ZenohAnswerPublisher) -> None:
    # Not abandoned on cancellation: the thread ends by itself once it has put the queue's rest.
    await trio.to_thread.run_sync(publisher._run, abandon_on_cancel=False)


def publish_to_zenoh_blocking(
    answer: BlockingAnswer,
    session: zenoh.Session,
    key_prefix: str = "pydisco",
    *,
    on_piece: Callable[[Piece], None] | None = None,
) -> int:
    """:func:`publish_to_zenoh` for a :class:`BlockingAnswer`, in the calling thread (which only
    reads and queues; the same kind of worker thread puts). Returns once everything was put; a
    Zenoh error in the worker is raised here after the answer was read."""
    publisher = ZenohAnswerPublisher(session, key_prefix, answer.answer_id)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            publisher._run()
        except BaseException as e:  # noqa: BLE001 - raised in the calling thread below
            failure.append(e)

    worker = threading.Thread(target=work, name=f"zenoh publisher {answer.answer_id}", daemon=True)
    worker.start()
    tokens = 0
    try:
        try:
            for piece in answer:
                publisher.token(piece)
                tokens += 1
                if on_piece is not None:
                    on_piece(piece)
        except AnswerFailed:
            publisher.finish(answer.report)
            raise
        publisher.finish(answer.report)  # the iteration closed the answer: the report is final
    finally:
        publisher._queue.put(_DONE)
        worker.join()
    if failure:
        raise failure[0]
    return tokens


async def publish_to_zenoh(
    answer: AnswerStream,
    session: zenoh.Session,
    key_prefix: str = "pydisco",
    *,
    on_piece: Callable[[Piece], None] | None = None,
) -> int:
    """Read ``answer`` to its end and publish its tokens, end message and report on Zenoh
    under ``key_prefix`` (see this module's docstring for the keys and payloads); returns the
    tokens published. ``on_piece``, if given, sees each piece too (in the Trio thread), for an
    application that shows the answer as well.

    This is the answer's reader (its pace is what the migration policy counts as read): do not
    iterate the answer as well. An answer that fails is published to its end (``"failed"``)
    and then raises ``AnswerFailed`` as iterating it would. On cancellation the tokens already
    read are still put, no end message or report is sent, and the cancellation propagates.
    """
    tokens = 0
    async with open_answer_publisher(session, key_prefix, answer.answer_id) as publisher:
        try:
            async for piece in answer:
                publisher.token(piece)
                tokens += 1
                if on_piece is not None:
                    on_piece(piece)
        except AnswerFailed:
            publisher.finish(answer.report)  # every committed token was read before this
            raise
        publisher.finish(answer.report)
    return tokens
