"""Many answers on one model: a step loop runs a batched engine as a step scheduler plans each
step (docs/device.md, docs/policies.md). The llama.cpp batched engine is
``pydisco.device.BatchedEngine``; the schedulers are in ``pydisco.policies``."""

from ._executor import Admission as Admission
from ._executor import BatchExecutor as BatchExecutor
from ._executor import StepEvent as StepEvent
from ._state import AdmissionRefused as AdmissionRefused
from ._state import LoopStatistics as LoopStatistics
from ._loop import StepLoop as StepLoop
from ._loop import rough_profile as rough_profile
from ._profile import LearnedStepProfile as LearnedStepProfile
from ._reader import ReaderModel as ReaderModel
from ._reader import BufferReport as BufferReport
from ._reader import ReportBox as ReportBox
from ._virtual import SimulatedExecutor as SimulatedExecutor
from ._virtual import VirtualStepLoop as VirtualStepLoop

__all__ = [
    "Admission",
    "AdmissionRefused",
    "BatchExecutor",
    "BufferReport",
    "LearnedStepProfile",
    "LoopStatistics",
    "ReaderModel",
    "ReportBox",
    "SimulatedExecutor",
    "StepEvent",
    "StepLoop",
    "VirtualStepLoop",
    "rough_profile",
]
