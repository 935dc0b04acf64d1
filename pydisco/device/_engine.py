"""A synchronous llama.cpp engine: one model, one context, one sequence, one owning thread.

Built on llama-cpp-python's low-level bindings (not ``llama_cpp.Llama``) because the device
actor needs what ``Llama`` hides: exact control of the KV cache for resume, an abort callback
that is active only while prefilling, and per-token delivery without a generator in between.

Not thread-safe: one thread at a time calls into an engine (the device actor's worker thread,
or the cloud server's). Concurrent use raises ``RuntimeError`` rather than corrupting state.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence

from llama_cpp import llama_cpp as C

from .._errors import ConfigurationError, EndpointError, ModelError, PromptTooLongError
from ._llama import DECODE_ABORTED, FLASH_ATTENTION, free_handles, init_backend, load_model, make_sampler, recent_log_text
from ._llama import default_threads as default_threads
from ._models import model_id as _model_id
from ._models import resolve_model_path
from ._text import PieceStream
from ._vocabulary import Plan, Vocabulary
from .._types import GenerationRequest, GenerationResult, TokenPiece

# Prompt tokens per llama_decode call while prefilling; also llama.cpp's batch and ubatch, so a
# call is one ubatch and an abort never leaves part of a chunk behind.
_CHUNK = 64

_NO_ABORT = C.ggml_abort_callback()  # a NULL callback: llama.cpp skips the check entirely


def _never() -> bool:
    return False


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
    ``extra_buffers`` None lets :func:`~pydisco.device._llama.use_extra_buffers` decide about weight repacking.
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
        init_backend(verbose)
        model = self._model = load_model(self.path, extra_buffers)
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
        self._logits_ready = False
        # The abort callback is installed only around prefill: llama.cpp calls it for every
        # graph node, and taking the GIL that often would slow single-token decoding.
        self._should_abort: Callable[[], bool] = _never
        self._abort_cb = C.ggml_abort_callback(self._abort_requested)

    def _open_context(self, model: int, n_ctx: int) -> None:
        self.vocabulary = Vocabulary(model)
        ctx_params = C.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = min(_CHUNK, n_ctx)
        ctx_params.n_threads = ctx_params.n_threads_batch = self.n_threads
        ctx_params.no_perf = True
        ctx_params.flash_attn_type = FLASH_ATTENTION
        ctx = C.llama_init_from_model(model, ctx_params)
        if not ctx:
            raise ModelError(
                f"llama.cpp could not create a context (n_ctx={n_ctx}) for {self.path}{recent_log_text()}"
            )
        self._ctx = ctx
        self.n_ctx = C.llama_n_ctx(ctx)
        self._chunk = min(_CHUNK, self.n_ctx)
        self._batch = C.llama_batch_init(self._chunk, 0, 1)
        self.n_vocab = self.vocabulary.n_vocab

    # -- text <-> tokens -------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Tokens of ``text``; by default no BOS and special-token names stay plain text."""
        return self.vocabulary.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids`` exactly as ``generate`` reports them (control tokens render empty)."""
        return self.vocabulary.detokenize(ids)

    # -- requests --------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise PromptTooLongError / ConfigurationError if ``request`` cannot run. No work done."""
        self._plan(request)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of ``request``'s prompt as this model sees it (chat template applied), without
        checking that the request fits."""
        self._check_open()
        return len(self.vocabulary.prompt(request))

    def tokens_to_prefill(self, request: GenerationRequest) -> int:
        """Tokens ``request`` would compute before its first token, given what the KV cache holds
        now (prompt + resumed prefix, less the cached prefix it can keep). An estimate when
        another thread is generating: the cache may change before the request runs."""
        try:
            plan = self._plan(request)
        except PromptTooLongError:  # it cannot run here; what it would cost does not matter
            return len(self.vocabulary.prompt(request)) + request.start_position
        return len(plan.target) - self._reusable(plan)

    def _reusable(self, plan: Plan) -> int:
        """How many cached rows ``plan`` keeps: the longest cached prefix whose tokens match and
        whose rows were computed as its uninterrupted run computes them (see _llama.FLASH_ATTENTION),
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

    def _plan(self, request: GenerationRequest) -> Plan:
        self._check_open()
        return self.vocabulary.plan(request, self.n_ctx)

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
        free_handles(self._batch, self._ctx, self._model)
        self._batch = self._ctx = self._model = None

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------

    def _generate(
        self,
        request: GenerationRequest,
        plan: Plan,
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
        sampler = make_sampler(request.sampling, self.seed)
        stream = PieceStream(request.stop, plan.primer, plan.primer_text)
        try:
            position = plan.start
            while True:
                token = C.llama_sampler_sample(sampler, ctx, -1)
                if self.vocabulary.is_end(token):
                    reason = "stop"
                    break
                generated += 1
                pieces, stopped = stream.push(position, token, self.vocabulary.piece(token))
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

    def _prefill(self, plan: Plan, should_abort: Callable[[], bool], computed: list[int]) -> None:
        """Make the cache hold exactly ``plan.target`` with logits for its last token.

        Keeps what :meth:`_reusable` allows, then decodes the rest of the prompt in chunks of up
        to _CHUNK rows from wherever it starts (never a chunk of one row: see _llama.FLASH_ATTENTION)
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
        if rc == DECODE_ABORTED:
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
