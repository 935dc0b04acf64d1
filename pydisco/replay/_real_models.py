"""Simulated endpoints in the shape of the real ones a real run uses (``pydisco.replay._real``).

- :class:`SerialDevice`: the real ``DeviceEndpoint`` runs one call at a time (a prepare or a
  generate) in FIFO order, on one KV cache that another request's work overwrites; this is
  :class:`SimulatedDevice` with those two facts added.
- The real cloud client does not hear when the server admits a request (the protocol has no
  such frame): that is ``SimulatedCloud(announces_admission=False)``.
"""

from __future__ import annotations

import trio

from .._types import GenerationRequest
from ._endpoints import SimulatedDevice, TraceBook, _DeviceState
from ._models import DeviceModel

__all__ = ["SerialDevice"]


class SerialDevice(SimulatedDevice):
    """One engine for every request: calls take turns (``trio.Lock`` is FIFO, as the real
    endpoint's ``CapacityLimiter(1)``), and the KV cache holds only the last request's tokens."""

    def __init__(self, model: DeviceModel, book: TraceBook) -> None:
        super().__init__(model, book)
        self._engine = trio.Lock()
        self._cache_holder = ""

    @property
    def answers_ahead(self) -> int:
        """Calls a new one would wait for (the one holding the engine and those queued), as the
        real endpoint says: DiSCo-S reads it."""
        stats = self._engine.statistics()
        return int(stats.locked) + stats.tasks_waiting

    def _validate(self, request: GenerationRequest) -> _DeviceState:
        state = super()._validate(request)
        state.busy = self._engine  # every request's calls share the one engine
        return state

    async def _prefill(self, request: GenerationRequest, state: _DeviceState) -> int:
        if self._cache_holder != request.request_id:  # another request used the cache since
            state.cached = 0
            self._cache_holder = request.request_id
        return await super()._prefill(request, state)

