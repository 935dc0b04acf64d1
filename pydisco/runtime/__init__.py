"""The runtime: ``open_runtime`` and ``BlockingRuntime``, one coordinator per answer, the
Trio side of the pacer, and the answer's report (docs/architecture.md, docs/embedding.md)."""

from ._blocking import BlockingAnswer as BlockingAnswer
from ._blocking import BlockingRuntime as BlockingRuntime
from ._answer import ENDPOINT_IDS as ENDPOINT_IDS
from ._handover import AnswerFailed as AnswerFailed
from ._pacing import ReleasedTokens as ReleasedTokens
from ._pacing import VirtualTimePacer as VirtualTimePacer
from ._pacing import trio_time_ns as trio_time_ns
from ._realtime import realtime_thread as realtime_thread
from ._realtime import set_thread_normal as set_thread_normal
from ._realtime import set_thread_realtime as set_thread_realtime
from ._report import AnswerReport as AnswerReport
from ._report import AnswerStatus as AnswerStatus
from ._report import EndpointUsage as EndpointUsage
from ._report import MigrationRecord as MigrationRecord
from ._report import Piece as Piece
from ._timeline import Timeline as Timeline
from ._timeline import TokenTimes as TokenTimes
from ._timeline import TransitionTimes as TransitionTimes
from ._timeline import chrome_trace as chrome_trace
from ._config import RuntimeConfig as RuntimeConfig
from ._health import Backoff as Backoff
from ._runtime import AnswerStream as AnswerStream
from ._runtime import Runtime as Runtime
from ._statistics import QOE_BUCKETS as QOE_BUCKETS
from ._statistics import RuntimeStatistics as RuntimeStatistics
from ._runtime import open_runtime as open_runtime
from ._shm import forward_to_shm as forward_to_shm
from ._shm import forward_to_shm_blocking as forward_to_shm_blocking
from ._zenoh import ZenohAnswerPublisher as ZenohAnswerPublisher
from ._zenoh import open_answer_publisher as open_answer_publisher
from ._zenoh import publish_to_zenoh as publish_to_zenoh
from ._zenoh import publish_to_zenoh_blocking as publish_to_zenoh_blocking

__all__ = [
    "ENDPOINT_IDS",
    "AnswerFailed",
    "AnswerReport",
    "AnswerStatus",
    "AnswerStream",
    "Backoff",
    "BlockingAnswer",
    "BlockingRuntime",
    "EndpointUsage",
    "MigrationRecord",
    "Piece",
    "ReleasedTokens",
    "QOE_BUCKETS",
    "Runtime",
    "RuntimeStatistics",
    "RuntimeConfig",
    "Timeline",
    "TokenTimes",
    "TransitionTimes",
    "VirtualTimePacer",
    "ZenohAnswerPublisher",
    "chrome_trace",
    "forward_to_shm",
    "forward_to_shm_blocking",
    "open_answer_publisher",
    "open_runtime",
    "publish_to_zenoh",
    "publish_to_zenoh_blocking",
    "realtime_thread",
    "set_thread_normal",
    "set_thread_realtime",
    "trio_time_ns",
]
