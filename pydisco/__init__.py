"""pydisco: an embedded runtime that streams an LLM's answer with an on-device and a cloud model
working together."""

from __future__ import annotations

from ._core import EndpointCounters as EndpointCounters
from ._core import EndpointRole as EndpointRole
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
from ._core import RingStatistics as RingStatistics
from ._core import Token as Token
from ._core import TokenBatch as TokenBatch
from ._core import TokenRing as TokenRing
from ._core import TransitionRecord as TransitionRecord
from ._core import now_ns as now_ns
from ._blocking import BlockingAnswer as BlockingAnswer
from ._blocking import BlockingRuntime as BlockingRuntime
from ._coordinator import AnswerFailed as AnswerFailed
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import EndpointError as EndpointError
from ._errors import EndpointUnavailable as EndpointUnavailable
from ._errors import ModelError as ModelError
from ._errors import PromptTooLongError as PromptTooLongError
from ._errors import PydiscoError as PydiscoError
from ._pacing import ReleasedTokens as ReleasedTokens
from ._pacing import VirtualTimePacer as VirtualTimePacer
from ._report import AnswerReport as AnswerReport
from ._report import EndpointUsage as EndpointUsage
from ._report import MigrationRecord as MigrationRecord
from ._report import Piece as Piece
from ._runtime import AnswerStream as AnswerStream
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeConfig as RuntimeConfig
from ._runtime import open_runtime as open_runtime
from ._types import GenerationRequest as GenerationRequest
from ._types import GenerationResult as GenerationResult
from ._types import Sampling as Sampling
from ._types import TokenPiece as TokenPiece

__version__ = "0.1.0"

# Loading these would load llama.cpp or the transports: resolved on first use instead.
_LAZY = {
    "DeviceEndpoint": "pydisco._device",
    "open_device_endpoint": "pydisco._device",
    "DeviceProfile": "pydisco._profile",
    "CostRates": "pydisco._profile",
    "AnswerCost": "pydisco._profile",
    "CloudEndpoint": "pydisco._cloud",
    "open_cloud_endpoint": "pydisco._cloud",
    "ServerConfig": "pydisco._server",
    "serve": "pydisco._server",
    "LlamaBackend": "pydisco._backends",
    "OpenAIUpstreamBackend": "pydisco._backends",
    "open_loopback_cloud": "pydisco._loopback",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pydisco' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
