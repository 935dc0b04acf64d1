"""Shared by the device-engine tests: one real model per test session, and a Trio runner."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from pydisco.device import LlamaEngine
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

# One thread: it is the fastest setting on a busy 2-core machine (see default_threads).
THREADS = 1


@functools.cache
def shared_engine() -> LlamaEngine:
    """The default SmolLM2 model, loaded once per session (closed at interpreter exit)."""
    return LlamaEngine(n_threads=THREADS, n_ctx=2048)


def chat(question: str, max_tokens: int = 24, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": question}], max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


def run_engine(engine: LlamaEngine, request: GenerationRequest) -> tuple[list[TokenPiece], GenerationResult]:
    pieces: list[TokenPiece] = []
    result = engine.generate(request, pieces.append)
    return pieces, result


def trio_test(seconds: float) -> Callable[[F], F]:
    """Run an async test under trio.run with an absolute time limit."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> None:
            async def main() -> None:
                with trio.fail_after(seconds):
                    await fn(*args, **kwargs)

            trio.run(main)

        return wrapper  # type: ignore[return-value]

    return decorate
