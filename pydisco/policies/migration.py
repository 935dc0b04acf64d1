"""Migration policies: should an answer in flight move to the other endpoint now? Pure."""

from __future__ import annotations

from ._base import MigrationView
from ._estimates import catch_up_time, expected_remaining_tokens, migration_overhead

__all__ = ["DiscoMigrationPolicy", "NeverMigrationPolicy"]


class DiscoMigrationPolicy:
    """DiSCo's trigger: migrate iff the unread buffer covers the migration time,
    ``B ≥ margin·r_user·t_m`` (so the reader never waits for the handover), and it pays off,
    ``Δc·E[l_remaining] > overhead``, with ``Δc = cost(source) − cost(target)`` per decoded
    token. ``t_m``, ``E[l_remaining]`` and the overhead are the estimates of
    ``pydisco.policies._estimates``. An endpoint missing from ``cost_per_token`` costs 0.
    """

    name = "disco-migrate"

    def __init__(self, *, buffer_margin: float = 1.0) -> None:
        if not buffer_margin >= 0:
            raise ValueError(f"buffer_margin must be >= 0, got {buffer_margin!r}")
        self.buffer_margin = buffer_margin

    def buffer_covers(self, view: MigrationView) -> bool:
        return view.unread >= self.buffer_margin * view.reading_rate * catch_up_time(view)

    def saving(self, view: MigrationView) -> float:
        """Net expected saving of migrating now: ``Δc·E[l_remaining] − overhead``."""
        cost = view.cost_per_token
        delta = cost.get(view.source, 0.0) - cost.get(view.target, 0.0)
        return delta * expected_remaining_tokens(view) - migration_overhead(view)

    def should_migrate(self, view: MigrationView) -> bool:
        if view.source == view.target:
            return False
        return self.buffer_covers(view) and self.saving(view) > 0


class NeverMigrationPolicy:
    """Never migrate (failover still happens: that is the runtime's, not a policy's, call)."""

    name = "never"

    def should_migrate(self, view: MigrationView) -> bool:
        return False
