"""Many answers on one model: a step loop runs a batched engine as a step scheduler plans each
step (docs/device.md, docs/policies.md). The llama.cpp batched engine is
``pydisco.device.BatchedEngine``; the schedulers are in ``pydisco.policies``."""

from ._executor import Admission as Admission
from ._executor import BatchExecutor as BatchExecutor
from ._executor import StepEvent as StepEvent
from ._loop import AdmissionRefused as AdmissionRefused
from ._loop import LoopStatistics as LoopStatistics
from ._loop import StepLoop as StepLoop
from ._loop import rough_profile as rough_profile
from ._profile import LearnedStepProfile as LearnedStepProfile

__all__ = [
    "Admission",
    "AdmissionRefused",
    "BatchExecutor",
    "LearnedStepProfile",
    "LoopStatistics",
    "StepEvent",
    "StepLoop",
    "rough_profile",
]
