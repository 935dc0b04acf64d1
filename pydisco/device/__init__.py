"""The device side: one llama.cpp model in the application's process (docs/device.md).

``LlamaEngine`` is the synchronous engine one thread owns; ``DeviceEndpoint`` is the Trio actor
around it that the runtime talks to; ``DeviceProfile`` is its measured speed. ``BatchedEngine``
serves many answers at once on one context, and ``BatchedDeviceEndpoint`` runs it under a step
scheduler. Importing this
package loads llama.cpp; without it (a client-only install) importing this package raises
``MissingExtraError`` naming the extra to install.
"""

from .._errors import MissingExtraError as _MissingExtraError

_DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python", "jinja2": "jinja2"}  # module: what pip installs

try:  # checked here, before any submodule, since every one of them leads to llama.cpp
    import llama_cpp as _llama_cpp
    import jinja2 as _jinja2  # the engine renders the model's chat template with it
except ImportError as _missing:
    _what = _DISTRIBUTIONS.get(_missing.name or "", "llama-cpp-python")
    raise _MissingExtraError(f"a device model needs {_what}", "device") from _missing
del _jinja2, _llama_cpp

from ._batched import BatchedEngine as BatchedEngine
from ._batched_endpoint import BatchedDeviceEndpoint as BatchedDeviceEndpoint
from ._batched_endpoint import measure_step_profile as measure_step_profile
from ._batched_endpoint import open_batched_device_endpoint as open_batched_device_endpoint
from ._endpoint import CostLedger as CostLedger
from ._endpoint import CostTotals as CostTotals
from ._endpoint import DeviceEndpoint as DeviceEndpoint
from ._endpoint import open_device_endpoint as open_device_endpoint
from ._engine import LlamaEngine as LlamaEngine
from ._engine import default_threads as default_threads
from ._models import DEFAULT_MODEL_PACKAGE as DEFAULT_MODEL_PACKAGE
from ._models import check_gguf as check_gguf
from ._models import default_model_path as default_model_path
from ._models import model_id as model_id
from ._models import resolve_model_path as resolve_model_path
from ._profile import AnswerCost as AnswerCost
from ._profile import CostRates as CostRates
from ._profile import DeviceProfile as DeviceProfile
from ._profile import fit_line as fit_line
from ._profile import load_or_measure_profile as load_or_measure_profile
from ._profile import load_profile as load_profile
from ._profile import machine_id as machine_id
from ._profile import measure_profile as measure_profile
from ._profile import profile_cache_dir as profile_cache_dir
from ._profile import profile_cache_path as profile_cache_path
from ._profile import save_profile as save_profile

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "AnswerCost",
    "BatchedDeviceEndpoint",
    "BatchedEngine",
    "CostLedger",
    "CostRates",
    "CostTotals",
    "DeviceEndpoint",
    "DeviceProfile",
    "LlamaEngine",
    "check_gguf",
    "default_model_path",
    "default_threads",
    "fit_line",
    "load_or_measure_profile",
    "load_profile",
    "machine_id",
    "measure_profile",
    "measure_step_profile",
    "model_id",
    "open_batched_device_endpoint",
    "open_device_endpoint",
    "profile_cache_dir",
    "profile_cache_path",
    "resolve_model_path",
    "save_profile",
]
