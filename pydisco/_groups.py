"""Turning a Trio nursery's ExceptionGroup back into the one exception that tells the story,
so no public context manager leaks a group when one exception is what happened."""

from __future__ import annotations

import trio


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The non-group exceptions inside ``group``, depth first, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The story of a failed nursery: its one real error (a failing task makes the nursery
    cancel the others, so Cancelled siblings are noise); if every leaf is a Cancelled (an outer
    cancellation reached all tasks), the first of them; otherwise the group itself."""
    found = leaves(group)
    errors = [e for e in found if not isinstance(e, trio.Cancelled)]
    if len(errors) == 1:
        return errors[0]
    if not errors and found:
        return found[0]
    return group
