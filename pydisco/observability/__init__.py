"""Seeing what pydisco does: logging with the answer id on every record (here), metrics in
Prometheus' format (``pydisco.observability.metrics``, which loads prometheus_client), and
per-answer timelines (``AnswerReport.timeline``). See docs/observability.md."""

from ._logging import ANSWER_ID as ANSWER_ID
from ._logging import AnswerIdFilter as AnswerIdFilter
from ._logging import JsonLinesFormatter as JsonLinesFormatter
from ._logging import answer_context as answer_context
from ._logging import configure_logging as configure_logging
from ._logging import current_answer_id as current_answer_id
from ._logging import get_logger as get_logger
from ._logging import new_answer_id as new_answer_id

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
