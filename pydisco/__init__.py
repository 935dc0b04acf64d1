"""pydisco: an embedded runtime that streams an LLM's answer with an on-device and a cloud model
working together.

Start with ``open_runtime(RuntimeConfig(...))`` (async, Trio) or ``BlockingRuntime`` (a
background thread), then ``stream(messages)`` for one answer and its ``AnswerReport``. Your own
endpoints meet the ``Endpoint`` protocol; your own policies live in ``pydisco.policies``;
test helpers in ``pydisco.testing``.

The device names (``DeviceEndpoint``, ...) need the ``device`` extra and the server names
(``serve``, ...) the ``server`` extra; both load on first use, so importing pydisco stays
light.
"""

import logging as _logging
import typing as _typing

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
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import EndpointError as EndpointError
from ._errors import EndpointUnavailable as EndpointUnavailable
from ._errors import MissingExtraError as MissingExtraError
from ._errors import ModelError as ModelError
from ._errors import PromptTooLongError as PromptTooLongError
from ._errors import PydiscoError as PydiscoError
from ._types import Endpoint as Endpoint
from ._types import GenerationRequest as GenerationRequest
from ._types import GenerationResult as GenerationResult
from ._types import Message as Message
from ._types import Sampling as Sampling
from ._types import TokenPiece as TokenPiece
from ._types import TokenSink as TokenSink
from ._types import notify_admitted as notify_admitted
from ._types import notify_prefilled as notify_prefilled
from .policies import Budget as Budget
from .policies import Slo as Slo
from .runtime import AnswerFailed as AnswerFailed
from .runtime import AnswerReport as AnswerReport
from .runtime import AnswerStatus as AnswerStatus
from .runtime import AnswerStream as AnswerStream
from .runtime import Backoff as Backoff
from .runtime import BlockingAnswer as BlockingAnswer
from .runtime import BlockingRuntime as BlockingRuntime
from .runtime import EndpointUsage as EndpointUsage
from .runtime import MigrationRecord as MigrationRecord
from .runtime import Piece as Piece
from .runtime import ReleasedTokens as ReleasedTokens
from .runtime import Runtime as Runtime
from .runtime import RuntimeConfig as RuntimeConfig
from .runtime import VirtualTimePacer as VirtualTimePacer
from .runtime import open_runtime as open_runtime
from .runtime import realtime_thread as realtime_thread
from .runtime import set_thread_normal as set_thread_normal
from .runtime import set_thread_realtime as set_thread_realtime

__version__ = "0.1.0"

# A library logs; the application decides what is shown (nothing, unless it configures logging).
_logging.getLogger("pydisco").addHandler(_logging.NullHandler())

# Names loaded on first use: (module, a module that must be installed for it). Loading them
# eagerly would load llama.cpp (device) or the server side and its TLS stack (cloud).
_LAZY: dict[str, tuple[str, str]] = {
    "DeviceEndpoint": ("pydisco.device", "llama_cpp"),
    "open_device_endpoint": ("pydisco.device", "llama_cpp"),
    "DeviceProfile": ("pydisco.device", "llama_cpp"),
    "CostRates": ("pydisco.device", "llama_cpp"),
    "AnswerCost": ("pydisco.device", "llama_cpp"),
    "CloudEndpoint": ("pydisco.cloud", "aioquic"),
    "open_cloud_endpoint": ("pydisco.cloud", "aioquic"),
    "ServerConfig": ("pydisco.cloud", "httpx"),
    "serve": ("pydisco.cloud", "httpx"),
    "LlamaBackend": ("pydisco.cloud", "httpx"),
    "OpenAIUpstreamBackend": ("pydisco.cloud", "httpx"),
    "open_loopback_cloud": ("pydisco.cloud", "httpx"),
}

if _typing.TYPE_CHECKING:  # type checkers see the real names; at run time __getattr__ loads them
    from .cloud import CloudEndpoint as CloudEndpoint
    from .cloud import LlamaBackend as LlamaBackend
    from .cloud import OpenAIUpstreamBackend as OpenAIUpstreamBackend
    from .cloud import ServerConfig as ServerConfig
    from .cloud import open_cloud_endpoint as open_cloud_endpoint
    from .cloud import open_loopback_cloud as open_loopback_cloud
    from .cloud import serve as serve
    from .device import AnswerCost as AnswerCost
    from .device import CostRates as CostRates
    from .device import DeviceEndpoint as DeviceEndpoint
    from .device import DeviceProfile as DeviceProfile
    from .device import open_device_endpoint as open_device_endpoint
else:  # only at run time, so a type checker flags a misspelt name instead of accepting it

    def __getattr__(name: str) -> _typing.Any:
        if name not in _LAZY:
            raise AttributeError(f"module 'pydisco' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(_LAZY[name][0]), name)
        globals()[name] = value  # loaded once
        return value


__all__ = [
    "AnswerCost",
    "AnswerFailed",
    "AnswerReport",
    "AnswerStatus",
    "AnswerStream",
    "AuthenticationError",
    "Backoff",
    "BlockingAnswer",
    "BlockingRuntime",
    "Budget",
    "CloudEndpoint",
    "CommitRecord",
    "ConfigurationError",
    "CostRates",
    "DeviceEndpoint",
    "DeviceProfile",
    "Endpoint",
    "EndpointCounters",
    "EndpointError",
    "EndpointRole",
    "EndpointUnavailable",
    "EndpointUsage",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "IllegalTransition",
    "LlamaBackend",
    "Message",
    "MigrationEvent",
    "MigrationMachine",
    "MigrationRecord",
    "MigrationState",
    "MissPolicy",
    "MissingExtraError",
    "ModelError",
    "NativeCollector",
    "OfferResult",
    "OpenAIUpstreamBackend",
    "PaceSchedule",
    "Pacer",
    "PacerStatistics",
    "Piece",
    "PromptTooLongError",
    "PydiscoError",
    "ReleaseRecord",
    "ReleasedTokens",
    "RingStatistics",
    "Runtime",
    "RuntimeConfig",
    "Sampling",
    "ServerConfig",
    "Slo",
    "Token",
    "TokenBatch",
    "TokenPiece",
    "TokenRing",
    "TokenSink",
    "TransitionRecord",
    "VirtualTimePacer",
    "notify_admitted",
    "notify_prefilled",
    "now_ns",
    "open_cloud_endpoint",
    "open_device_endpoint",
    "open_loopback_cloud",
    "open_runtime",
    "realtime_thread",
    "serve",
    "set_thread_normal",
    "set_thread_realtime",
]


def __dir__() -> list[str]:
    """The public names, less those whose extra is not installed here (so ``help(pydisco)``
    works on a client-only install), and the subpackages already loaded."""
    import importlib.util

    usable = [n for n in __all__ if n not in _LAZY or importlib.util.find_spec(_LAZY[n][1]) is not None]
    loaded = [n for n, v in globals().items() if not n.startswith("_") and type(v) is type(_typing) and n not in usable]
    return sorted(usable + loaded + ["__version__"])
