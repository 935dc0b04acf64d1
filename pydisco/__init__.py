"""pydisco: an embedded runtime that streams an LLM's answer with an on-device and a cloud model
working together."""

from __future__ import annotations

from ._core import CommitRecord as CommitRecord
from ._core import EndpointCounters as EndpointCounters
from ._core import EndpointRole as EndpointRole
from ._core import FinishReason as FinishReason
from ._core import IllegalTransition as IllegalTransition
from ._core import MigrationEvent as MigrationEvent
from ._core import MigrationMachine as MigrationMachine
from ._core import MigrationState as MigrationState
from ._core import MissPolicy as MissPolicy
from ._core import NativeCollector as NativeCollector
from ._core import OfferResult as OfferResult
from ._core import PaceSchedule as PaceSchedule
from ._core import Pacer as Pacer
from ._core import PacerStatistics as PacerStatistics
from ._core import ReleaseRecord as ReleaseRecord
from ._core import RingStatistics as RingStatistics
from ._core import ShmEvent as ShmEvent
from ._core import ShmForwarder as ShmForwarder
from ._core import ShmReading as ShmReading
from ._core import ShmRingError as ShmRingError
from ._core import ShmRingProducer as ShmRingProducer
from ._core import ShmRingReader as ShmRingReader
from ._core import unlink_shm_ring as unlink_shm_ring
from ._core import Token as Token
from ._core import TokenBatch as TokenBatch
from ._core import TokenRing as TokenRing
from ._core import TransitionRecord as TransitionRecord
from ._core import now_ns as now_ns
from .runtime import BlockingAnswer as BlockingAnswer
from .runtime import BlockingRuntime as BlockingRuntime
from .runtime import AnswerFailed as AnswerFailed
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import EndpointError as EndpointError
from ._errors import EndpointUnavailable as EndpointUnavailable
from ._errors import ModelError as ModelError
from ._errors import PromptTooLongError as PromptTooLongError
from ._errors import PydiscoError as PydiscoError
from .runtime import ReleasedTokens as ReleasedTokens
from .runtime import VirtualTimePacer as VirtualTimePacer
from .runtime import AnswerReport as AnswerReport
from .runtime import EndpointUsage as EndpointUsage
from .runtime import MigrationRecord as MigrationRecord
from .runtime import Piece as Piece
from .runtime import AnswerStream as AnswerStream
from .runtime import Runtime as Runtime
from .runtime import RuntimeConfig as RuntimeConfig
from .runtime import open_runtime as open_runtime
from ._types import GenerationRequest as GenerationRequest
from ._types import GenerationResult as GenerationResult
from ._types import Sampling as Sampling
from ._types import TokenPiece as TokenPiece

__version__ = "0.1.0"

# A library logs; the application decides what is shown (nothing, unless it configures logging).
import logging as _logging

_logging.getLogger("pydisco").addHandler(_logging.NullHandler())

# Loading these would load llama.cpp or the transports: resolved on first use instead.
_LAZY = {
    "DeviceEndpoint": "pydisco.device",
    "open_device_endpoint": "pydisco.device",
    "DeviceProfile": "pydisco.device",
    "CostRates": "pydisco.device",
    "AnswerCost": "pydisco.device",
    "CloudEndpoint": "pydisco.cloud",
    "open_cloud_endpoint": "pydisco.cloud",
    "ServerConfig": "pydisco.cloud",
    "serve": "pydisco.cloud",
    "LlamaBackend": "pydisco.cloud",
    "OpenAIUpstreamBackend": "pydisco.cloud",
    "open_loopback_cloud": "pydisco.cloud",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pydisco' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
