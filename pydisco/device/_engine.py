"""A synchronous llama.cpp engine: one model, one context, one sequence, one owning thread.

Built on llama-cpp-python's low-level bindings (not ``llama_cpp.Llama``) because the device
actor needs what ``Llama`` hides: exact control of the KV cache for resume, an abort callback
that is active only while prefilling, and per-token delivery without a generator in between.

Not thread-safe: one thread at a time calls into an engine (the device actor's worker thread,
or the cloud server's). Concurrent use raises ``RuntimeError`` rather than corrupting state.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

import jinja2.sandbox
from llama_cpp import llama_cpp as C

from .._errors import ConfigurationError, EndpointError, ModelError, PromptTooLongError
from ._models import model_id as _model_id
from ._models import resolve_model_path
from .._types import GenerationRequest, GenerationResult, Sampling, TokenPiece

# Prompt tokens per llama_decode call while prefilling; also llama.cpp's batch and ubatch, so a
# call is one ubatch and an abort never leaves part of a chunk behind.
_CHUNK = 64
_DECODE_ABORTED = 2  # llama_decode's return code when the abort callback said stop

# Why any cached prefix can be reused and a greedy resume is still exact (measured here, guarded
# by tests/test_llama_engine.py): without flash attention, llama.cpp's CPU kernels compute a row
# of a multi-row batch the same whatever the batch's size or offset, so prompt rows may come from
# any earlier schedule; only a batch of one row takes other kernels (a matrix-vector product), and
# generation decodes exactly such batches. So each cached row remembers whether it was computed
# alone, and is reused only where the uninterrupted run would have computed it the same way.
# Flash attention stays off as in llama-cpp-python's default: its tiled path for batches makes a
# row depend on its batch (logits moved by up to ~0.9 between schedules, greedy answers diverged
# within 20 tokens); with a BF16 V cache it is batch invariant too, but 6-14 % slower here.
_FLASH_ATTENTION = C.LLAMA_FLASH_ATTN_TYPE_DISABLED

_backend_lock = threading.Lock()
_backend_ready = False


_NO_ABORT = C.ggml_abort_callback()  # a NULL callback: llama.cpp skips the check entirely


def _never() -> bool:
    return False


def _init_backend(verbose: bool) -> None:
    global _backend_ready, _verbose
    with _backend_lock:
        _verbose = _verbose or verbose
        if not _backend_ready:
            C.llama_backend_init()
            C.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
            _backend_ready = True


def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log: kept (for error messages) rather than printed, unless verbose.

    An aborted prefill, which the device does on every migration, logs an error line; printing
    it would alarm for nothing. The callback is process-wide, as llama.cpp's log is.
    """
    line = text.decode("utf-8", "replace")
    _recent_log.append(line)
    if _verbose:
        sys.stderr.write(line)


def _recent_log_text() -> str:
    text = "".join(_recent_log).strip()
    return f"; llama.cpp said: {text[-600:]}" if text else ""


_recent_log: collections.deque[str] = collections.deque(maxlen=24)
_verbose = False
_LOG_CALLBACK = C.llama_log_callback(_log)


def default_threads() -> int:
    """Half the CPUs this process may run on (as llama-cpp-python does).

    llama.cpp's threads meet at a barrier after every operation, so one descheduled thread
    stalls the rest: on a busy 2-core machine, 2 threads decode several times slower than 1.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


def _use_extra_buffers() -> bool:
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


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """A validated request: the exact tokens to have in the cache before sampling."""

    prompt: list[int]
    prefix: list[int]  # the resumed part of the answer, as tokens of this model
    primer: bytes  # the answer's bytes so far, so a character split at the seam is completed
    primer_text: str
    start: int  # position of the first token to generate
    limit: int  # positions stop before this (max_tokens counts the whole answer)

    @property
    def target(self) -> list[int]:
        return self.prompt + self.prefix


class _Aborted(Exception):
    """should_abort() said stop (internal: generate/prefill_only turn it into a result)."""


class LlamaEngine:
    """One GGUF model with its context, driven synchronously by one thread at a time.

    ``generate`` streams one answer; ``prefill_only`` warms the cache for one. Both keep the KV
    cache afterwards and reuse its longest matching prefix next time, like llama.cpp's server.
    An abort (``should_abort()`` returning True) ends ``generate`` with finish_reason
    ``"cancelled"`` (it does not raise) and leaves the engine usable.

    ``model_path`` None means the default model (:func:`default_model_path`); ``n_threads``
    None means half the CPUs; ``seed`` is mixed into every request's sampling seed;
    ``extra_buffers`` None lets :func:`_use_extra_buffers` decide about weight repacking.
    """

    model_id: str
    n_ctx: int

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        seed: int = 0,
        verbose: bool = False,
        extra_buffers: bool | None = None,
    ) -> None:
        if n_threads is not None and n_threads < 1:
            raise ConfigurationError(f"n_threads must be >= 1, got {n_threads!r}")
        if n_ctx < 16:
            raise ConfigurationError(f"n_ctx must be >= 16, got {n_ctx!r}")
        self._model: int | None = None
        self._ctx: int | None = None
        self._batch: C.llama_batch | None = None
        self._in_use = threading.Lock()
        self.path = resolve_model_path(model_path)
        self.model_id = _model_id(self.path)
        self.n_threads = n_threads or default_threads()
        self.seed = seed & 0xFFFFFFFF
        _init_backend(verbose)

        model_params = C.llama_model_default_params()
        model_params.use_extra_bufts = _use_extra_buffers() if extra_buffers is None else extra_buffers
        model = C.llama_model_load_from_file(os.fsencode(self.path), model_params)
        if not model:
            raise ModelError(
                f"llama.cpp could not load the model (corrupt or unsupported): {self.path}{_recent_log_text()}"
            )
        self._model = model
        try:
            self._open_context(model, n_ctx)
        except BaseException:
            self.close()
            raise

        # KV cache bookkeeping: self._cached[i] is the token whose KV sits at position i,
        # self._alone[i] whether it was computed in a batch of one row, and _logits_ready says
        # the context's last logits belong to self._cached[-1].
        self._cached: list[int] = []
        self._alone: list[bool] = []
        self._last_prompt: tuple[object, list[int]] | None = None  # see _prompt
        self._logits_ready = False
        # The abort callback is installed only around prefill: llama.cpp calls it for every
        # graph node, and taking the GIL that often would slow single-token decoding.
        self._should_abort: Callable[[], bool] = _never
        self._abort_cb = C.ggml_abort_callback(self._abort_requested)

    def _open_context(self, model: int, n_ctx: int) -> None:
        self._vocab = C.llama_model_get_vocab(model)
        ctx_params = C.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = min(_CHUNK, n_ctx)
        ctx_params.n_threads = ctx_params.n_threads_batch = self.n_threads
        ctx_params.no_perf = True
        ctx_params.flash_attn_type = _FLASH_ATTENTION
        ctx = C.llama_init_from_model(model, ctx_params)
        if not ctx:
            raise ModelError(
                f"llama.cpp could not create a context (n_ctx={n_ctx}) for {self.path}{_recent_log_text()}"
            )
        self._ctx = ctx
        self.n_ctx = C.llama_n_ctx(ctx)
        self._chunk = min(_CHUNK, self.n_ctx)
        self._batch = C.llama_batch_init(self._chunk, 0, 1)
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._chat = _ChatTemplate.from_model(model, self._token_text)

    # -- text <-> tokens -------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Tokens of ``text``; by default no BOS and special-token names stay plain text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (C.llama_token * capacity)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids`` exactly as ``generate`` reports them (control tokens render empty)."""
        return b"".join(self._piece(i) for i in ids)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def _token_text(self, token: int) -> str:
        """A special token's name as written in templates, e.g. ``<|im_start|>``."""
        return bytes(C.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    # -- requests --------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise PromptTooLongError / ConfigurationError if ``request`` cannot run. No work done."""
        self._plan(request)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of ``request``'s prompt as this model sees it (chat template applied), without
        checking that the request fits."""
        self._check_open()
        return len(self._prompt(request))

    def tokens_to_prefill(self, request: GenerationRequest) -> int:
        """Tokens ``request`` would compute before its first token, given what the KV cache holds
        now (prompt + resumed prefix, less the cached prefix it can keep). An estimate when
        another thread is generating: the cache may change before the request runs."""
        try:
            plan = self._plan(request)
        except PromptTooLongError:  # it cannot run here; what it would cost does not matter
            return len(self._prompt(request)) + request.start_position
        return len(plan.target) - self._reusable(plan)

    def _reusable(self, plan: _Plan) -> int:
        """How many cached rows ``plan`` keeps: the longest cached prefix whose tokens match and
        whose rows were computed as its uninterrupted run computes them (see _FLASH_ATTENTION),
        less the last row when it must be decoded again for fresh logits, less one more when
        that would leave a single prompt row to compute alone."""
        target, n_prompt = plan.target, len(plan.prompt)
        common = 0
        for i, (token, alone) in enumerate(zip(self._cached, self._alone)):
            if i >= len(target) or token != target[i] or alone != _computed_alone(i, n_prompt):
                break
            common += 1
        if common == len(target) == len(self._cached) and self._logits_ready:
            return common
        keep = min(common, len(target) - 1)
        if keep == n_prompt - 1 and n_prompt >= 2:
            keep -= 1
        return keep

    def _prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens (not to be mutated). One request is counted, planned, validated
        and run, and its resumes have the same prompt: the last prompt's tokens are kept, keyed
        by content (a caller may reuse one messages list, appending to it)."""
        source: object = (
            tuple(tuple(sorted(m.items())) for m in request.messages) if request.messages is not None else request.prompt
        )
        last = self._last_prompt
        if last is not None and last[0] == source:
            return last[1]
        if request.messages is not None:
            text = self._chat.render(request.messages)
            add_bos = self._add_bos and not self._chat.has_bos(text)  # the template may write it
            tokens = self.tokenize(text, add_special=add_bos, parse_special=True)
        else:
            assert request.prompt is not None
            tokens = self.tokenize(request.prompt, add_special=True, parse_special=True)
        self._last_prompt = (source, tokens)  # one assignment: safe to read from another thread
        return tokens

    def _plan(self, request: GenerationRequest) -> _Plan:
        self._check_open()
        for stop in request.stop:
            if not stop:
                raise ConfigurationError("stop strings must be non-empty")
        if not 0 <= request.sampling.seed <= 0xFFFFFFFF:
            raise ConfigurationError(f"sampling seed must fit 32 bits, got {request.sampling.seed!r}")
        if request.resume_position is not None and request.resume_position < 0:
            raise ConfigurationError(f"resume_position must be >= 0, got {request.resume_position!r}")
        prompt = self._prompt(request)
        if not prompt:
            raise ConfigurationError("the prompt is empty: there is nothing to condition on")
        if request.resume_text is not None:
            prefix = self.tokenize(request.resume_text)
            primer = request.resume_text.encode("utf-8")
        else:
            prefix = list(request.resume_token_ids)
            bad = [t for t in prefix if not 0 <= t < self.n_vocab]
            if bad:
                raise ConfigurationError(f"resume_token_ids outside this model's vocabulary: {bad[:5]}")
            primer = self.detokenize(prefix)
        start = request.start_position
        to_generate = max(0, request.max_tokens - start)
        needed = len(prompt) + len(prefix) + to_generate
        if needed > self.n_ctx:
            raise PromptTooLongError(
                f"prompt ({len(prompt)} tokens) + resumed prefix ({len(prefix)}) + tokens to generate "
                f"({to_generate}) = {needed} exceeds the context of {self.n_ctx} tokens"
            )
        primer_text = primer.decode("utf-8", "replace")
        return _Plan(prompt, prefix, primer, primer_text, start, request.max_tokens)

    def generate(
        self,
        request: GenerationRequest,
        on_token: Callable[[TokenPiece], None],
        should_abort: Callable[[], bool] = _never,
    ) -> GenerationResult:
        """Generate ``request``, calling ``on_token`` (in this thread) for each token in order.

        ``should_abort`` is polled between decode steps and, through llama.cpp's abort callback,
        during prefill. When it returns True generation ends with finish_reason ``"cancelled"``
        (nothing is raised) and the engine stays usable. ``max_tokens`` bounds the whole answer:
        positions run from ``request.start_position`` up to ``max_tokens - 1``. An exception
        from ``on_token`` propagates; the engine stays usable. ``generated_tokens`` counts the
        tokens sampled, including any that a stop string cut from the reported text.
        """
        plan = self._plan(request)
        with self._exclusive():
            return self._generate(request, plan, on_token, should_abort)

    def prefill_only(self, request: GenerationRequest, should_abort: Callable[[], bool] = _never) -> int:
        """Bring prompt + resumed prefix into the KV cache without generating.

        Returns the number of tokens computed (0 when the cache already held them). An abort
        stops early; the part computed so far stays cached and is reused later.
        """
        plan = self._plan(request)
        with self._exclusive():
            computed = [0]
            try:
                self._prefill(plan, should_abort, computed)
            except _Aborted:
                pass
            return computed[0]

    def clear_cache(self) -> None:
        """Forget the KV cache (the next request prefills from scratch); used for profiling."""
        with self._exclusive():
            self._truncate(0)

    @property
    def cached_tokens(self) -> int:
        """How many tokens the KV cache holds."""
        return len(self._cached)

    def close(self) -> None:
        """Free the context and the model. Idempotent; the engine is unusable afterwards."""
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            C.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------

    def _generate(
        self,
        request: GenerationRequest,
        plan: _Plan,
        on_token: Callable[[TokenPiece], None],
        should_abort: Callable[[], bool],
    ) -> GenerationResult:
        computed = [0]
        generated = 0

        def result(reason: str) -> GenerationResult:
            return GenerationResult(reason, len(plan.prompt), computed[0], generated)

        if plan.start >= plan.limit:
            return result("length")
        try:
            self._prefill(plan, should_abort, computed)
        except _Aborted:
            return result("cancelled")
        if should_abort():  # the cache may have held everything: no prefill, no check yet
            return result("cancelled")
        ctx = self._ctx
        assert ctx is not None
        sampler = _make_sampler(request.sampling, self.seed)
        stream = _PieceStream(request.stop, plan.primer, plan.primer_text)
        try:
            position = plan.start
            while True:
                token = C.llama_sampler_sample(sampler, ctx, -1)
                if C.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                generated += 1
                pieces, stopped = stream.push(position, token, self._piece(token))
                for piece in pieces:
                    on_token(piece)
                position += 1
                if stopped:
                    return result("stop")
                if position >= plan.limit:
                    reason = "length"
                    break
                if should_abort():
                    return result("cancelled")
                self._decode_one(token)
        finally:
            C.llama_sampler_free(sampler)
        for piece in stream.flush():
            on_token(piece)
        return result(reason)

    def _prefill(self, plan: _Plan, should_abort: Callable[[], bool], computed: list[int]) -> None:
        """Make the cache hold exactly ``plan.target`` with logits for its last token.

        Keeps what :meth:`_reusable` allows, then decodes the rest of the prompt in chunks of up
        to _CHUNK rows from wherever it starts (never a chunk of one row: see _FLASH_ATTENTION)
        and the resumed answer tokens one by one, as generation decodes them. ``computed[0]``
        counts the tokens decoded here.
        """
        target, n_prompt = plan.target, len(plan.prompt)
        keep = self._reusable(plan)
        if keep == len(target):
            return
        self._truncate(keep)
        ctx = self._ctx
        assert ctx is not None
        self._should_abort = should_abort
        try:
            while len(self._cached) < len(target):
                if should_abort():
                    raise _Aborted
                pos = len(self._cached)
                end = _chunk_end(pos, n_prompt, self._chunk)
                # A chunk can take long enough to need the abort callback; one token cannot.
                guarded = end - pos > 1
                if guarded:
                    C.llama_set_abort_callback(ctx, self._abort_cb, ctypes.c_void_p())
                try:
                    self._decode(target[pos:end], logits_last=end == len(target))
                finally:
                    computed[0] += len(self._cached) - pos
                    if guarded:
                        C.llama_set_abort_callback(ctx, _NO_ABORT, ctypes.c_void_p())
        finally:
            self._should_abort = _never

    def _decode_one(self, token: int) -> None:
        self._decode([token], logits_last=True)

    def _decode(self, tokens: list[int], *, logits_last: bool) -> None:
        batch, ctx = self._batch, self._ctx
        assert batch is not None and ctx is not None
        base = len(self._cached)
        n = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = base + i  # type: ignore[call-overload]  # the binding mistypes pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = False
        batch.logits[n - 1] = logits_last
        batch.n_tokens = n
        rc = C.llama_decode(ctx, batch)
        if rc == 0:
            self._cached.extend(tokens)
            self._alone.extend([n == 1] * n)
            self._logits_ready = logits_last
            return
        # Whatever llama.cpp did keep (finished ubatches on abort) stays cached and reusable.
        mem = C.llama_get_memory(ctx)
        kept = C.llama_memory_seq_pos_max(mem, 0) + 1 if mem else 0
        kept = max(base, min(kept, base + n))
        self._cached.extend(tokens[: kept - base])
        self._alone.extend([n == 1] * (kept - base))
        self._truncate(kept)
        if rc == _DECODE_ABORTED:
            raise _Aborted
        raise EndpointError(f"llama_decode failed with code {rc} at position {base}", code="decode_failed")

    def _truncate(self, n: int) -> None:
        """Drop cached tokens from position ``n`` on."""
        ctx = self._ctx
        assert ctx is not None
        mem = C.llama_get_memory(ctx)
        if mem and not C.llama_memory_seq_rm(mem, 0, n, -1):
            C.llama_memory_clear(mem, True)
            n = 0
        del self._cached[n:]
        del self._alone[n:]
        self._logits_ready = False

    def _abort_requested(self, _data: ctypes.c_void_p) -> bool:
        try:
            return bool(self._should_abort())
        except BaseException:  # an exception cannot cross into C; treat it as "stop"
            return True

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("this LlamaEngine is closed")

    def _exclusive(self) -> _Exclusive:
        return _Exclusive(self._in_use)


def _computed_alone(position: int, n_prompt: int) -> bool:
    """Whether the uninterrupted run computes row ``position`` in a batch of one row: every
    answer row (generation decodes them one by one), and the prompt only when it is one token."""
    return position >= n_prompt or n_prompt == 1


def _chunk_end(pos: int, n_prompt: int, chunk: int) -> int:
    """End of the batch that starts at ``pos``: up to ``chunk`` prompt rows, never leaving one
    prompt row for a batch of its own; past the prompt, one row."""
    if pos >= n_prompt:
        return pos + 1
    end = min(n_prompt, pos + chunk)
    if n_prompt - end == 1:
        end -= 1  # chunk >= 3 keeps both this batch and the last one multi-row
    return end


class _Exclusive:
    """Fail loudly when two threads use one engine at once (a caller bug, not a wait)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("LlamaEngine is owned by one thread at a time, and it is busy")

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def _make_sampler(sampling: Sampling, engine_seed: int) -> int:
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


class _PieceStream:
    """Token bytes in, TokenPieces of whole characters out, with stop strings cut off.

    A token whose bytes end inside a character reports ``""`` and the token that completes the
    character carries it. While the text might be the start of a stop string, tokens are held
    back: reported later (``flush`` at the end), or dropped if the stop string completes. An
    aborted answer does not flush; its held tokens are never reported.
    """

    def __init__(self, stops: Sequence[str], primer: bytes, primer_text: str) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._decoder.decode(primer)  # only to carry a partial character over the resume seam
        self._stops = tuple(stops)
        longest = max((len(s) for s in self._stops), default=1)
        # Text already in the answer that a stop string could begin in (never re-emitted).
        self._context = primer_text[-(longest - 1) :] if longest > 1 else ""
        self._held: list[TokenPiece] = []

    def push(self, position: int, token: int, data: bytes) -> tuple[list[TokenPiece], bool]:
        """Add one token; return the pieces to report now and whether a stop string ended it."""
        piece = TokenPiece(position, token, self._decoder.decode(data))
        if not self._stops:
            return [piece], False
        self._held.append(piece)
        text = self._context + "".join(p.text for p in self._held)
        # Only stop strings that end in the new text count (the primer was already accepted).
        starts = (text.find(s, max(0, len(self._context) - len(s) + 1)) for s in self._stops)
        hits = [i for i in starts if i >= 0]
        if hits:
            out = self._release(min(hits) - len(self._context), cut=True)
            self._held.clear()
            return out, True
        keep = max((_overlap(text, s) for s in self._stops), default=0)
        return self._release(len(text) - keep - len(self._context), cut=False), False

    def flush(self) -> list[TokenPiece]:
        out, self._held = self._held, []
        return out

    def _release(self, upto: int, *, cut: bool) -> list[TokenPiece]:
        """Report held pieces whose text ends by ``upto`` (relative to the held text)."""
        out: list[TokenPiece] = []
        done = 0
        while self._held and done + len(self._held[0].text) <= upto:
            piece = self._held.pop(0)
            out.append(piece)
            done += len(piece.text)
        if cut and self._held and upto > done:
            first = self._held[0]
            out.append(TokenPiece(first.position, first.token_id, first.text[: upto - done]))
        if out:
            self._context = ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class _ChatTemplate:
    """The model's own chat template (Jinja, as in Hugging Face), rendered in a sandbox."""

    template: jinja2.Template | None
    bos: str
    eos: str

    @classmethod
    def from_model(cls, model: int, token_text: Callable[[int], str]) -> _ChatTemplate:
        vocab = C.llama_model_get_vocab(model)
        bos_id, eos_id = C.llama_vocab_bos(vocab), C.llama_vocab_eos(vocab)
        bos = token_text(bos_id) if bos_id >= 0 else ""
        eos = token_text(eos_id) if eos_id >= 0 else ""
        source = C.llama_model_chat_template(model, None)
        if not source:
            return cls(None, bos, eos)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            template = env.from_string(source.decode("utf-8"))
        except jinja2.TemplateError as e:
            raise ModelError(f"the model's chat template does not parse: {e}") from e
        return cls(template, bos, eos)

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        if self.template is None:
            # No template in the file: ChatML, the most common convention.
            turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return turns + "<|im_start|>assistant\n"
        try:
            return self.template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos,
                eos_token=self.eos,
            )
        except jinja2.TemplateError as e:
            raise ConfigurationError(f"the chat template rejected these messages: {e}") from e

    def has_bos(self, text: str) -> bool:
        return bool(self.bos) and text.startswith(self.bos)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)
