"""Logging under ``pydisco.*`` names with the answer's id on every record.

The id lives in a context variable: the runtime sets it in the tasks it starts for an answer,
and Trio copies a task's context into every task (and worker thread) started from it, so each
record logged on the answer's behalf — by the coordinator, an endpoint run, the device's
worker thread, the cloud client — carries it without being passed around. The server sets it
from the request's id (the client sends its answer id as the request id), so one id follows an
answer across both sides.

``get_logger(name)`` gives an adapter that puts ``answer_id`` on each record (None outside any
answer), so an application's own handlers and formatters can use ``%(answer_id)s``.
``AnswerIdFilter`` does the same on a handler, for records from loggers that are not adapters.
The library configures nothing: the ``pydisco`` logger has a NullHandler until the
application (or the CLI, ``configure_logging``) says what to show.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import IO, Any

__all__ = [
    "ANSWER_ID",
    "AnswerIdFilter",
    "JsonLinesFormatter",
    "answer_context",
    "configure_logging",
    "current_answer_id",
    "get_logger",
    "new_answer_id",
]

ANSWER_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pydisco_answer_id", default=None)
"""The id of the answer the current task works for (None outside any answer)."""

_ids = itertools.count(1)
_PROCESS_TAG = f"{os.getpid():x}"


def new_answer_id() -> str:
    """A fresh answer id, unique within the process and unlikely to repeat across processes
    (pid and a counter: short enough to read in a log line)."""
    return f"{_PROCESS_TAG}-{next(_ids)}"


def current_answer_id() -> str | None:
    return ANSWER_ID.get()


@contextlib.contextmanager
def answer_context(answer_id: str | None) -> Iterator[None]:
    """Records logged in this block, and in tasks started from it, carry ``answer_id``."""
    token = ANSWER_ID.set(answer_id)
    try:
        yield
    finally:
        ANSWER_ID.reset(token)


class _AnswerAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds ``answer_id`` (from the context, unless the call gives one) to each record's extra."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("answer_id", ANSWER_ID.get())
        kwargs["extra"] = extra
        return msg, kwargs


def get_logger(name: str) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """The logger ``name`` (a ``pydisco.*`` name), putting the answer id on every record."""
    return _AnswerAdapter(logging.getLogger(name), {})


class AnswerIdFilter(logging.Filter):
    """On a handler: gives records that have none the answer id of the task that logged them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "answer_id"):
            record.answer_id = ANSWER_ID.get()
        return True


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "answer_id",
    "answer_tag",
}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO 8601, UTC), level, logger, answer_id,
    message, the fields given with ``extra=``, and the traceback as text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "answer_id": getattr(record, "answer_id", None),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """``time level logger [answer id] message``; ``-`` for a record outside any answer."""

    def format(self, record: logging.LogRecord) -> str:
        record.answer_tag = getattr(record, "answer_id", None) or "-"
        return super().format(record)


LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(level: int, *, json_lines: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """For a program (the CLI): show pydisco's records at ``level`` and up on ``stream``
    (stderr), as text or JSON lines; other libraries' warnings and errors too. Returns the
    handler (remove it from the root logger to undo)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(AnswerIdFilter())
    if json_lines:
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s [%(answer_tag)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # Other libraries stay at warnings (their debug output would drown pydisco's); pydisco's
    # records reach the root's handler at any level the pydisco logger lets through.
    root.setLevel(logging.WARNING)
    logging.getLogger("pydisco").setLevel(level)
    return handler
