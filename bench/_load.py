"""Load and paced answers shared by the latency benchmarks (bench/core.py, bench/embedding.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from pydisco import Pacer, RuntimeConfig, TokenRing

BUSY_LOOP = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass\n"


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """n CPU-bound processes at normal priority; stopped on exit (and after 10 min anyway)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        time.sleep(0.2)  # let them get going
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def paced_pacer(interval_ns: int, count: int, handoff_lead_ns: int | None = None) -> Pacer:
    """A pacer for ``count`` tokens with the runtime's own settings, not started: attach its
    reader before :func:`start_paced` (a reader attached after the first release would count
    its own late start in that token's latency). The released tokens go to ``pacer.output``.
    ``handoff_lead_ns``: the announcement's lead (None: the runtime's default)."""
    # The runtime's own settings: its pacer is awake pacer_spin_s before each release (so its
    # announcement is on time even when its wake-up comes late), and announces reader_handoff_s
    # ahead. The pacer class's bare default (spin 200 us) would time another configuration.
    shipped = RuntimeConfig(device_model=None)
    lead = round(shipped.reader_handoff_s * 1e9) if handoff_lead_ns is None else handoff_lead_ns
    return Pacer(TokenRing(count * 2), TokenRing(count * 2), interval_ns=interval_ns,
                 spin_ns=round(shipped.pacer_spin_s * 1e9), handoff_lead_ns=lead)  # fmt: skip


def start_paced(pacer: Pacer, count: int) -> int:
    """Starts ``pacer`` (SCHED_FIFO asked) with ``count`` tokens all committed at t0, slightly
    in the future so token 0 is paced too: token i's deadline is t0 + i*interval. Returns t0."""
    pacer.start(realtime=True)
    t0 = time.monotonic_ns() + 2_000_000
    for i in range(count):
        assert pacer.input.try_push(i, i, "x", arrived_ns=t0)
    return t0


def start_paced_answer(interval_ns: int, count: int, handoff_lead_ns: int | None = None) -> tuple[Pacer, int]:
    """:func:`paced_pacer` started at once (its reader takes ``pacer.output`` as it comes): the
    pacer and t0."""
    pacer = paced_pacer(interval_ns, count, handoff_lead_ns)
    return pacer, start_paced(pacer, count)
