"""The migration decision, taken in one place: after every commit and every standby sync (the
only moments the decision's inputs can turn it true — consumption only shrinks the buffer), the
migration policy gets the facts and says whether to hand the answer to the other endpoint. Who
reads the answer (a Trio task, a blocking thread, a C++ consumer) plays no part."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from .._types import Endpoint
from ..observability._logging import get_logger
from ..policies._base import DeviceSpeed, MigrationPolicy, MigrationView
from ._answer import Answer, State
from ._handover import Handover
from ._health import Health

log = get_logger("pydisco.runtime")


@dataclasses.dataclass(frozen=True)
class MigrationFacts:
    """What the runtime knows beyond this answer, handed to the policy as is."""

    prompt_tokens: int
    reading_rate: float
    answer_lengths: Sequence[int]
    device: DeviceSpeed | None
    server_ttft_samples_s: Sequence[float]
    cost_per_token: Mapping[str, float]
    max_migrations: int
    prefill_cost_per_token: Mapping[str, float] = dataclasses.field(default_factory=dict)


class MigrationTrigger:
    def __init__(
        self,
        policy: MigrationPolicy,
        facts: MigrationFacts,
        answer: Answer,
        endpoints: Mapping[str, Endpoint],
        handover: Handover,
        device_synced: Callable[[], int | None],
        health: Health,
    ) -> None:
        self._policy = policy
        self._facts = facts
        self._answer = answer
        self._endpoints = endpoints
        self._handover = handover
        self._device_synced = device_synced
        self._health = health

    def consider(self) -> None:
        answer, facts = self._answer, self._facts
        if answer.state != State.STREAMING or answer.machine.migrations >= facts.max_migrations:
            return
        source = answer.source
        target = "device" if source == "cloud" else "cloud"
        if source is None or target not in self._endpoints or answer.has_failed(target) or self._health.down(target):
            return
        view = MigrationView(
            now_s=answer.seconds(answer.clock.now_ns()),
            source=source,  # type: ignore[arg-type]  # the runtime's endpoints are these two
            target=target,  # type: ignore[arg-type]
            prompt_tokens=facts.prompt_tokens,
            committed=answer.committed,
            unread=answer.committed - answer.consumed(),
            reading_rate=facts.reading_rate,
            max_tokens=answer.request.max_tokens,
            catch_up_tokens=self._catch_up_tokens(target),
            answer_lengths=facts.answer_lengths,
            device=facts.device,
            server_ttft_samples_s=facts.server_ttft_samples_s,
            cost_per_token=facts.cost_per_token,
            prefill_cost_per_token=facts.prefill_cost_per_token,
        )
        if self._policy.should_migrate(view):
            log.info(
                "migrate %s -> %s: %s decided at token %d (unread %d, catch-up %d tokens)",
                source, target, getattr(self._policy, "name", type(self._policy).__name__), view.committed,
                view.unread, view.catch_up_tokens,
            )  # fmt: skip
            self._handover.begin(target)

    def _catch_up_tokens(self, target: str) -> int:
        """Tokens ``target`` must prefill to take over now."""
        committed = self._answer.committed
        synced = self._device_synced() if target == "device" else None
        if synced is not None:
            return committed - synced  # its cache holds the prompt and the synced prefix
        return self._facts.prompt_tokens + committed
