"""llama.cpp as both device engines load it: the backend and its log, the model, the numerics
choice (flash attention off), threads, and sampler chains.

Shared by ``LlamaEngine`` (one sequence) and ``BatchedEngine`` (many), so the two load and
sample the same way and their outputs can be compared.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading

from llama_cpp import llama_cpp as C

from .._errors import ModelError
from .._types import Sampling

# Why any cached prefix can be reused and a greedy resume is still exact (measured here, guarded
# by tests/test_llama_engine.py): without flash attention, llama.cpp's CPU kernels compute a row
# of a multi-row batch the same whatever the batch's size or offset, so prompt rows may come from
# any earlier schedule; only a batch of one row takes other kernels (a matrix-vector product), and
# generation decodes exactly such batches. So each cached row remembers whether it was computed
# alone, and is reused only where the uninterrupted run would have computed it the same way.
# Flash attention stays off as in llama-cpp-python's default: its tiled path for batches makes a
# row depend on its batch (logits moved by up to ~0.9 between schedules, greedy answers diverged
# within 20 tokens); with a BF16 V cache it is batch invariant too, but 6-14 % slower here.
FLASH_ATTENTION = C.LLAMA_FLASH_ATTN_TYPE_DISABLED

DECODE_ABORTED = 2  # llama_decode's return code when the abort callback said stop
DECODE_NO_SLOT = 1  # llama_decode's return code when the KV cache has no room for the batch

_backend_lock = threading.Lock()
_backend_ready = False
_verbose = False
_recent_log: collections.deque[str] = collections.deque(maxlen=24)


def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log: kept (for error messages) rather than printed, unless verbose.

    An aborted prefill, which the device does on every migration, logs an error line; printing
    it would alarm for nothing. The callback is process-wide, as llama.cpp's log is.
    """
    line = text.decode("utf-8", "replace")
    _recent_log.append(line)
    if _verbose:
        sys.stderr.write(line)


_LOG_CALLBACK = C.llama_log_callback(_log)


def init_backend(verbose: bool) -> None:
    global _backend_ready, _verbose
    with _backend_lock:
        _verbose = _verbose or verbose
        if not _backend_ready:
            C.llama_backend_init()
            C.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
            _backend_ready = True


def recent_log_text() -> str:
    """llama.cpp's last log lines, for an error message ("" when it said nothing)."""
    text = "".join(_recent_log).strip()
    return f"; llama.cpp said: {text[-600:]}" if text else ""


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Half the CPUs this process may run on (as llama-cpp-python does).

    llama.cpp's threads meet at a barrier after every operation, so one descheduled thread
    stalls the rest: on a busy 2-core machine, 2 threads decode several times slower than 1.
    """
    return max(1, usable_cpus() // 2)


def use_extra_buffers() -> bool:
    """Whether llama.cpp may repack weights into CPU-specific layouts (AMX, AVX interleaved).

    Off on CPUs that advertise AMX: in VMs that advertise it without enabling the tile state
    (Firecracker, here), llama.cpp's AMX matmul segfaults on the first multi-token batch.
    ``PYDISCO_LLAMA_EXTRA_BUFFERS=1`` (or ``0``) overrides the guess.
    """
    forced = os.environ.get("PYDISCO_LLAMA_EXTRA_BUFFERS")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return " amx_tile" not in f.read()
    except OSError:
        return True


def load_model(path: str | os.PathLike[str], extra_buffers: bool | None) -> int:
    """The model at ``path`` (a llama_model pointer); ModelError with llama.cpp's words if not."""
    params = C.llama_model_default_params()
    params.use_extra_bufts = use_extra_buffers() if extra_buffers is None else extra_buffers
    model: int = C.llama_model_load_from_file(os.fsencode(path), params)
    if not model:
        raise ModelError(f"llama.cpp could not load the model (corrupt or unsupported): {path}{recent_log_text()}")
    return model


def free_handles(batch: object | None, ctx: object | None, model: object | None) -> None:
    """Free an engine's llama.cpp batch, context and model (any of them may be None)."""
    if batch is not None:
        C.llama_batch_free(batch)
    if ctx is not None:
        C.llama_free(ctx)
    if model is not None:
        C.llama_model_free(model)


def llama_cpp_server_command(python: str, *args: str) -> list[str]:
    """A command line that starts llama-cpp-python's OpenAI-compatible server with ``args``,
    under the same weight-repacking choice as pydisco's engines (``use_extra_buffers``), so it
    runs on the VMs whose AMX matmul crashes. For tests and benchmarks that compare against it."""
    script = (
        "import llama_cpp.llama_cpp as C\n"
        "_default = C.llama_model_default_params\n"
        "def _params():\n"
        "    p = _default()\n"
        f"    p.use_extra_bufts = {use_extra_buffers()!r}\n"
        "    return p\n"
        "C.llama_model_default_params = _params\n"
        "from llama_cpp.server.__main__ import main\n"
        "main()\n"
    )
    return [python, "-c", script, *args]


def make_sampler(sampling: Sampling, engine_seed: int) -> int:
    """A sampler chain for ``sampling`` (free it with ``llama_sampler_free``): greedy, or top-k,
    top-p, temperature and a draw seeded by the request's seed XOR the engine's."""
    chain: int = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if sampling.greedy:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        return chain
    if sampling.top_k > 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(sampling.top_p, 1))
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(sampling.temperature))
    seed = (sampling.seed ^ engine_seed) & 0xFFFFFFFF
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    return chain
