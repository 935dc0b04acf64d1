"""Replay a workload through the shipped runtime in virtual time (docs/replay.md).

::

    from pydisco.replay import DeviceModel, ReplayConfig, ServerModel, replay
    from pydisco.workloads import iter_trace, load_server_ttft

    server = ServerModel.from_samples(load_server_ttft("server_ttft/groq_70b.json"))
    summary = replay(iter_trace("AzureLLMInferenceTrace_conv.csv"),
                     ReplayConfig(dispatch="disco-d", budget=0.3, device=DeviceModel.smollm2(), server=server))
    print(summary.to_json())
"""

from ._endpoints import SharedDevice as SharedDevice
from ._endpoints import SimulatedCloud as SimulatedCloud
from ._endpoints import SimulatedDevice as SimulatedDevice
from ._endpoints import TraceBook as TraceBook
from ._models import DeviceModel as DeviceModel
from ._models import LastHop as LastHop
from ._models import Outages as Outages
from ._models import ServerModel as ServerModel
from ._run import OUTCOMES as OUTCOMES
from ._run import ReplayConfig as ReplayConfig
from ._run import ReplaySummary as ReplaySummary
from ._run import RequestRow as RequestRow
from ._run import replay as replay
from ._stats import Histogram as Histogram

__all__ = [
    "OUTCOMES",
    "DeviceModel",
    "Histogram",
    "LastHop",
    "Outages",
    "ReplayConfig",
    "ReplaySummary",
    "RequestRow",
    "ServerModel",
    "SharedDevice",
    "SimulatedCloud",
    "SimulatedDevice",
    "TraceBook",
    "replay",
]
