"""Dispatch, migration and step-scheduling policies, chosen by name.

The runtime asks for a policy by name and never imports a concrete one::

    policy = create_dispatch_policy("disco-d", server_ttft_prior=samples)
    decision = policy.decide(view)
    ...
    policy.observe(outcome)

Add your own with :func:`register_dispatch_policy` / :func:`register_migration_policy`: a
factory (a class, or any callable) that takes the policy's options as keyword arguments and
returns an object meeting :class:`DispatchPolicy` / :class:`MigrationPolicy`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from .._errors import ConfigurationError

from ._base import AnswerOutcome as AnswerOutcome
from ._base import Budget as Budget
from ._base import DeviceSpeed as DeviceSpeed
from ._base import DispatchDecision as DispatchDecision
from ._base import DispatchPolicy as DispatchPolicy
from ._base import DispatchView as DispatchView
from ._base import EndpointName as EndpointName
from ._base import Handoff as Handoff
from ._base import MigrationPolicy as MigrationPolicy
from ._base import MigrationView as MigrationView
from ._base import Slo as Slo
from ._budget import BudgetLedger as BudgetLedger
from ._budget import WaitPlan as WaitPlan
from ._budget import disco_d_plan as disco_d_plan
from ._budget import disco_s_threshold as disco_s_threshold
from .dispatch import CloudOnlyPolicy as CloudOnlyPolicy
from .dispatch import DeviceOnlyPolicy as DeviceOnlyPolicy
from .dispatch import DiscoDPolicy as DiscoDPolicy
from .dispatch import DiscoSPolicy as DiscoSPolicy
from .dispatch import PdDevicePolicy as PdDevicePolicy
from .dispatch import RaceBothPolicy as RaceBothPolicy
from .dispatch import pd_device_plan as pd_device_plan
from ._estimates import DEFAULT_CLOUD_TTFT_S as DEFAULT_CLOUD_TTFT_S
from ._estimates import UNPROFILED_DEVICE as UNPROFILED_DEVICE
from ._estimates import catch_up_time as catch_up_time
from ._estimates import cloud_ttft_estimate as cloud_ttft_estimate
from ._estimates import expected_answer_tokens as expected_answer_tokens
from ._estimates import expected_remaining_tokens as expected_remaining_tokens
from ._estimates import migration_overhead as migration_overhead
from ._step import Phase as Phase
from ._step import SequenceView as SequenceView
from ._step import StepPlan as StepPlan
from ._step import StepProfile as StepProfile
from ._step import StepScheduler as StepScheduler
from ._step import StepView as StepView
from .scheduling import AndesScheduler as AndesScheduler
from .scheduling import FastServeScheduler as FastServeScheduler
from .scheduling import FcfsScheduler as FcfsScheduler
from .scheduling import SliceScheduler as SliceScheduler
from .scheduling import slice_feasibility as slice_feasibility
from .migration import DiscoMigrationPolicy as DiscoMigrationPolicy
from .migration import NeverMigrationPolicy as NeverMigrationPolicy

_P = TypeVar("_P")

DispatchFactory = Callable[..., DispatchPolicy]
MigrationFactory = Callable[..., MigrationPolicy]
StepSchedulerFactory = Callable[..., StepScheduler]

_DISPATCH: dict[str, DispatchFactory] = {
    "device-only": DeviceOnlyPolicy,
    "cloud-only": CloudOnlyPolicy,
    "race-both": RaceBothPolicy,
    "disco-s": DiscoSPolicy,
    "disco-d": DiscoDPolicy,
    "pd-device": PdDevicePolicy,
}
_MIGRATION: dict[str, MigrationFactory] = {
    "disco-migrate": DiscoMigrationPolicy,
    "never": NeverMigrationPolicy,
}
_STEP: dict[str, StepSchedulerFactory] = {
    "fcfs": FcfsScheduler,
    "fastserve": FastServeScheduler,
    "slice": SliceScheduler,
    "andes": AndesScheduler,
}


def _register(table: dict[str, Callable[..., _P]], kind: str, name: str,
              factory: Callable[..., _P], replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory for {kind} {name!r} is not callable")
    if name in table and not replace:
        raise ValueError(f"{kind} {name!r} is already registered (pass replace=True)")
    table[name] = factory


def _create(table: dict[str, Callable[..., _P]], kind: str, name: str, options: dict[str, Any]) -> _P:
    try:
        factory = table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ConfigurationError(f"unknown {kind} {name!r}; known: {known}") from None
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise ConfigurationError(f"{kind} {name!r}: bad options {sorted(options)}: {e}") from None
    except ValueError:
        pass  # no signature to check (some builtins); the call itself will tell
    return factory(**options)


def register_dispatch_policy(name: str, factory: DispatchFactory, *, replace: bool = False) -> None:
    """Make ``create_dispatch_policy(name, **options)`` call ``factory(**options)``."""
    _register(_DISPATCH, "dispatch policy", name, factory, replace)


def register_migration_policy(name: str, factory: MigrationFactory, *, replace: bool = False) -> None:
    """Make ``create_migration_policy(name, **options)`` call ``factory(**options)``."""
    _register(_MIGRATION, "migration policy", name, factory, replace)


def create_dispatch_policy(name: str, **options: Any) -> DispatchPolicy:
    """A new dispatch policy by name; ``ConfigurationError`` (a ``ValueError``) for an unknown
    name or option."""
    return _create(_DISPATCH, "dispatch policy", name, options)


def create_migration_policy(name: str, **options: Any) -> MigrationPolicy:
    """A new migration policy by name; ``ConfigurationError`` (a ``ValueError``) for an unknown
    name or option."""
    return _create(_MIGRATION, "migration policy", name, options)


def dispatch_policy_names() -> tuple[str, ...]:
    return tuple(sorted(_DISPATCH))


def migration_policy_names() -> tuple[str, ...]:
    return tuple(sorted(_MIGRATION))


def register_step_scheduler(name: str, factory: StepSchedulerFactory, *, replace: bool = False) -> None:
    """Make ``create_step_scheduler(name, **options)`` call ``factory(**options)``."""
    _register(_STEP, "step scheduler", name, factory, replace)


def create_step_scheduler(name: str, **options: Any) -> StepScheduler:
    """A new step scheduler by name; ``ConfigurationError`` for an unknown name or option."""
    return _create(_STEP, "step scheduler", name, options)


def step_scheduler_names() -> tuple[str, ...]:
    return tuple(sorted(_STEP))
