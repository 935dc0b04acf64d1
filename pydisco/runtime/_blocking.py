"""The blocking API, for control loops that are not async.

The runtime runs on its own thread (a Trio loop); the caller's thread takes released tokens
straight from the answer's native ring with a blocking pop that releases the GIL, so a token
reaches the caller without a hop through the Trio thread::

    with pydisco.BlockingRuntime(config) as rt:
        answer = rt.stream(messages=[{"role": "user", "content": "Turn left?"}])
        for piece in answer:
            act_on(piece.text)
        print(answer.report.summary())
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import trio

from ._coordinator import AnswerCoordinator
from ._report import AnswerReport, Piece
from ._runtime import AnswerStream, Runtime, RuntimeConfig, open_runtime
from .._types import Endpoint, Message

# A finish is signalled by waking the ring's consumer; this bounds the one race where the wake
# lands between the consumer's last look and its wait.
_FINISH_POLL_S = 0.05


class BlockingAnswer:
    """One answer, iterated from any one thread. Close it (or finish iterating) to free it."""

    def __init__(self, runtime: BlockingRuntime, answer: AnswerStream, closed: trio.Event, sealed: trio.Event) -> None:
        self._runtime = runtime
        self._answer = answer
        self._coordinator: AnswerCoordinator = answer._coordinator
        self._closed_event = closed
        self._sealed_event = sealed
        self._delivered: list[Piece] = []
        self._closed = False

    def __iter__(self) -> Iterator[Piece]:
        ring = self._coordinator.released_ring
        try:
            while True:
                total = self._coordinator.final_count()
                if total is not None and ring.statistics().popped >= total:
                    break
                token = ring.pop_wait(timeout=_FINISH_POLL_S)  # blocks without the GIL
                if token is None:
                    continue
                piece = self._coordinator.piece_from(token)
                self._delivered.append(piece)
                yield piece
            error = self._coordinator.error
            if error is not None:
                raise error
        finally:
            self.close()

    def close(self) -> None:
        """End the answer (cancelling it if still running) and seal its report."""
        if self._closed:
            return
        self._closed = True
        self._coordinator.record_delivered(self._delivered)
        self._runtime._call(self._closed_event.set)
        trio.from_thread.run(self._sealed_event.wait, trio_token=self._runtime._token)

    @property
    def report(self) -> AnswerReport:
        return self._answer.report

    def __enter__(self) -> BlockingAnswer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingRuntime:
    """A :class:`Runtime` on a background thread. Use as a context manager."""

    def __init__(self, config: RuntimeConfig = RuntimeConfig(), *, endpoints: Mapping[str, Endpoint] | None = None) -> None:
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

    def _call(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stream(self, messages: Sequence[Message] | None = None, **kwargs: Any) -> BlockingAnswer:
        """Start one answer (the arguments of :meth:`Runtime.stream`) and return it to iterate."""
        if self._runtime is None or self._nursery is None:
            raise RuntimeError("use BlockingRuntime as a context manager")
        runtime, nursery = self._runtime, self._nursery

        async def open_answer() -> tuple[AnswerStream, trio.Event, trio.Event]:
            closed, sealed = trio.Event(), trio.Event()

            async def hold(task_status: trio.TaskStatus[AnswerStream]) -> None:
                try:
                    async with runtime.stream(messages, **kwargs) as answer:
                        task_status.started(answer)
                        await closed.wait()
                finally:
                    sealed.set()  # the report is final

            answer: AnswerStream = await nursery.start(hold)
            return answer, closed, sealed

        answer, closed, sealed = trio.from_thread.run(open_answer, trio_token=self._token)
        return BlockingAnswer(self, answer, closed, sealed)
