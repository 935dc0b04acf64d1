"""Device standby: while the cloud decodes, the device's KV cache follows the committed prefix.

Each time the prefix has grown, the device prefills it (``prepare``), so a failover or a
migration to the device computes only the tokens committed since its last sync instead of the
whole prompt and answer. It spends device tokens on speculation, so the dispatch policy decides
whether to do it (``DispatchDecision.device_standby``; not under a device budget).
"""

from __future__ import annotations

from collections.abc import Callable

from .._types import Endpoint
from ._answer import Answer, State
from ._supervision import Runs, Usage


class DeviceStandby:
    def __init__(
        self,
        answer: Answer,
        device: Endpoint,
        runs: Runs,
        usage: Usage,
        by_token_ids: Callable[[], bool],
        on_synced: Callable[[], None],
    ) -> None:
        self._answer = answer
        self._prepare = getattr(device, "prepare")
        self._runs = runs
        self._usage = usage
        self._by_token_ids = by_token_ids
        self._on_synced = on_synced
        self.synced: int | None = None  # answer tokens the device's cache holds

    @staticmethod
    def possible(device: Endpoint | None) -> bool:
        return device is not None and getattr(device, "prepare", None) is not None

    def _should_follow(self) -> bool:
        answer = self._answer
        return (
            answer.state == State.STREAMING
            and answer.source == "cloud"
            and not answer.has_failed("device")
            and not self._runs.is_running("device")
            and answer.committed > (self.synced if self.synced is not None else -1)
        )

    async def run(self) -> None:
        """Follow the committed prefix until cancelled (the answer's end). A failed prefill ends
        standby, not the answer: the device may still serve it."""
        answer = self._answer
        while True:
            await answer.wait_until(self._should_follow)
            position = answer.committed
            try:
                computed = await self._prepare(answer.request_at(position, by_token_ids=self._by_token_ids()))
            except Exception:
                return
            self._usage.add_prefill("device", computed)
            self.synced = position
            self._on_synced()
