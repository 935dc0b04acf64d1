"""The blocking API, for control loops that are not async.

The runtime runs on its own thread (a Trio loop); the caller's thread takes released tokens
straight from the answer's native ring with a blocking pop that releases the GIL, until the
answer's end record — no polling, no hop through the Trio thread, and nothing read from the
migration machine outside the thread that owns it::

    with pydisco.BlockingRuntime(config) as rt:
        answer = rt.stream(messages=[{"role": "user", "content": "Turn left?"}])
        for piece in answer:
            act_on(piece.text)
        print(answer.report.summary())
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import trio

from .._core import TokenRing
from .._errors import ConfigurationError
from .._types import Endpoint, Message, Sampling
from ..policies._base import Slo
from ._answer import ENDPOINT_NAMES
from ._config import RuntimeConfig
from ._reader import piece_from
from ._report import AnswerReport, Piece
from ._runtime import AnswerStream, Runtime, open_runtime
from ._statistics import RuntimeStatistics

T = TypeVar("T")


class BlockingAnswer:
    """One answer, iterated from any one thread. Close it (or finish iterating) to free it."""

    def __init__(self, runtime: BlockingRuntime, answer: AnswerStream, closed: trio.Event, sealed: trio.Event) -> None:
        self._runtime = runtime
        self._answer = answer
        self._closed_event = closed
        self._sealed_event = sealed
        self._closed = False

    def __iter__(self) -> Iterator[Piece]:
        """The released tokens, blocking without the GIL between them. Raises AnswerFailed
        (after every committed token) when no endpoint could finish the answer."""
        coordinator = self._answer._coordinator
        ring, started_ns = coordinator.released_ring, coordinator.answer.started_ns
        try:
            while True:
                token = ring.pop_wait()  # no timeout: the end record always comes
                if token is None:
                    continue  # woken with nothing to take
                if token.is_end:
                    break
                yield piece_from(token, ENDPOINT_NAMES, started_ns)
            error = coordinator.error  # set in the Trio thread before the end record was pushed
            if error is not None:
                raise error
        finally:
            self.close()

    @property
    def answer_id(self) -> str:
        """The answer's id (see ``AnswerStream.answer_id``)."""
        return self._answer.answer_id

    @property
    def released_ring(self) -> TokenRing:
        """The answer's native ring, for a reader that is not this iterator: a C++ thread, a
        control loop taking what is there once per tick (``pop_many``, never blocking),
        ``forward_to_shm_blocking``. Use one or the other, never both; the ring ends with the
        answer's end record."""
        return self._answer.released_ring

    def close(self) -> None:
        """End the answer (cancelling it if still running) and seal its report."""
        if self._closed:
            return
        self._closed = True
        self._runtime._call(self._closed_event.set)
        trio.from_thread.run(self._sealed_event.wait, trio_token=self._runtime._token)

    @property
    def report(self) -> AnswerReport:
        """The report: final once the answer is closed; while it runs, as of now (finish
        reason "running")."""
        if self._sealed_event.is_set():
            return self._answer.report
        return self._runtime._call(lambda: self._answer.report)

    def __enter__(self) -> BlockingAnswer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingRuntime:
    """A :class:`Runtime` on a background thread. Use as a context manager.

    Real time only: ``virtual_time=True`` is refused (a virtual clock needs the caller inside
    the Trio run; use ``open_runtime`` under ``trio.testing.MockClock`` for that).
    """

    def __init__(self, config: RuntimeConfig = RuntimeConfig(), *, endpoints: Mapping[str, Endpoint] | None = None) -> None:
        if config.virtual_time:
            raise ConfigurationError("BlockingRuntime runs in real time; use open_runtime with a MockClock for virtual time")
        self._config = config
        self._endpoints = endpoints
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._runtime: Runtime | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> BlockingRuntime:
        self._thread = threading.Thread(target=self._thread_main, name="pydisco-runtime", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        if self._stop is not None:
            self._call(self._stop.set)
        self._thread.join()
        self._thread = None

    def _thread_main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # reported to __enter__ if it happened before ready
            self._failure = e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_runtime(self._config, endpoints=self._endpoints) as runtime:
            async with trio.open_nursery() as nursery:
                self._runtime, self._nursery = runtime, nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

    def _call(self, fn: Callable[[], T]) -> T:
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def statistics(self) -> RuntimeStatistics:
        """See :meth:`Runtime.statistics` (read in the runtime's thread)."""
        if self._runtime is None:
            raise RuntimeError("use BlockingRuntime as a context manager")
        return self._call(self._runtime.statistics)

    def stream(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        max_tokens: int = 128,
        sampling: Sampling = Sampling(),
        stop: tuple[str, ...] = (),
        slo: Slo | None = None,
        pace: bool | None = None,
        request_id: str = "",
    ) -> BlockingAnswer:
        """Start one answer (the arguments of :meth:`Runtime.stream`) and return it to iterate.
        Bad arguments raise ConfigurationError here, in the caller's thread."""
        if self._runtime is None or self._nursery is None:
            raise RuntimeError("use BlockingRuntime as a context manager")
        runtime, nursery = self._runtime, self._nursery

        async def open_answer() -> tuple[AnswerStream, trio.Event, trio.Event]:
            closed, sealed = trio.Event(), trio.Event()

            async def hold(task_status: trio.TaskStatus[AnswerStream]) -> None:
                try:
                    async with runtime.stream(
                        messages, prompt=prompt, max_tokens=max_tokens, sampling=sampling, stop=stop,
                        slo=slo, pace=pace, request_id=request_id,
                    ) as answer:  # fmt: skip
                        task_status.started(answer)
                        await closed.wait()
                finally:
                    sealed.set()  # the report is final

            answer: AnswerStream = await nursery.start(hold)
            return answer, closed, sealed

        answer, closed, sealed = trio.from_thread.run(open_answer, trio_token=self._token)
        return BlockingAnswer(self, answer, closed, sealed)
