"""A batched llama.cpp engine: one model, one context, many sequences decoded together.

``BatchedEngine`` meets ``pydisco.batching.BatchExecutor``: a step loop asks it, one step at a
time, for one token of each decoding sequence plus one prefill chunk, and it runs all of them
as one ``llama_batch`` (a ``seq_id`` per row, logits only on the rows that sample). The KV cache
is unified: ``n_ctx`` cells shared by all sequences.

Sequences live in *slots*, llama.cpp's sequence ids ``0 … max_sequences − 1``, as in llama.cpp's
server. A slot keeps its cells after its answer ends, so a later request that starts the same
way (a system prompt, an earlier turn) reuses them; a newcomer whose prompt begins with rows any
other slot holds, live or not, gets those cells by ``seq_cp`` (shared, not copied) instead of
computing them again. Kept cells of idle slots are given up when the cache runs out of room.

Numerics (docs/device.md): without flash attention llama.cpp computes every row of a batch of
two or more rows the same way, and only a batch of one row differently (see
``_llama.FLASH_ATTENTION``). So a row is reused only when it was computed in a multi-row batch,
a lone prefill row is computed beside the row before it (again), and a sequence decoding alone
decodes exactly as ``LlamaEngine`` does.

Used by one thread (the step loop's); ``validate``, ``count_prompt_tokens`` and
``tokens_to_prefill`` may be called from another (they only read).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence

from llama_cpp import llama_cpp as C

from .._errors import ConfigurationError, EndpointError, ModelError
from .._types import GenerationRequest, TokenPiece
from ..batching import Admission, AdmissionRefused, StepEvent
from ._llama import DECODE_NO_SLOT, FLASH_ATTENTION, default_threads, free_handles, init_backend, load_model, make_sampler, recent_log_text
from ._models import model_id as _model_id
from ._models import resolve_model_path
from ._text import PieceStream
from ._vocabulary import Plan, Vocabulary


_MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ


class _Slot:
    """One llama.cpp sequence: the rows its cells hold (``cached[i]`` at position i, whether it
    was computed in a batch of one row, and which cell holds it: rows shared by ``seq_cp`` have
    the same cell id in both slots) and the answer using it, if any."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.cached: list[int] = []
        self.alone: list[bool] = []
        self.cells: list[int] = []
        self.owner: int | None = None
        self.last_used = 0  # when it last had an owner (least recently used first to go)

    def reusable(self, plan: Plan) -> int:
        """Leading rows of ``plan``'s target this slot holds, computed as the engine computes
        them: prompt rows in multi-row batches; answer rows either way (generation decodes
        them alone or beside others, as the step has it)."""
        common = 0
        n_prompt = len(plan.prompt)
        for i, (token, alone, wanted) in enumerate(zip(self.cached, self.alone, plan.target)):
            if token != wanted or (alone and i < n_prompt and n_prompt > 1):
                break
            common += 1
        return common


@dataclasses.dataclass(eq=False)
class _Sequence:
    """A live answer in a slot."""

    slot: _Slot
    plan: Plan
    sampler: int
    stream: PieceStream
    position: int  # of the next token it produces
    pending: int | None = None  # sampled, not yet in the cache (the next decode feeds it)
    reused: int = 0  # leading rows it took from the cache at admission (not in its reservation)

    @property
    def prefilling(self) -> bool:
        return len(self.slot.cached) < len(self.plan.target)


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    sequence: _Sequence
    token: int
    position: int
    samples: bool  # its logits choose the sequence's next token


class BatchedEngine:
    """Many answers on one GGUF model and one context (a ``BatchExecutor``).

    ``n_ctx`` is the KV cells shared by all sequences (``kv_capacity``), ``max_batch`` the
    sequences decoding at once, ``max_sequences`` those admitted at once (decoding, prefilling or
    preempted; default four times ``max_batch``, at most llama.cpp's 256), ``prefill_chunk`` the most prompt rows one step carries (with
    the decode rows, one llama.cpp ubatch). Other arguments as :class:`LlamaEngine`.
    """

    model_id: str

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        max_batch: int = 8,
        max_sequences: int | None = None,
        n_ctx: int = 4096,
        prefill_chunk: int = 64,
        n_threads: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        extra_buffers: bool | None = None,
    ) -> None:
        if n_threads is not None and n_threads < 1:
            raise ConfigurationError(f"n_threads must be >= 1, got {n_threads!r}")
        if not 1 <= max_batch <= _MAX_SEQUENCES:
            raise ConfigurationError(f"max_batch must be in 1..{_MAX_SEQUENCES}, got {max_batch!r}")
        sequences = min(_MAX_SEQUENCES, 4 * max_batch) if max_sequences is None else max_sequences
        if not max_batch <= sequences <= _MAX_SEQUENCES:
            raise ConfigurationError(
                f"max_sequences must be in max_batch..{_MAX_SEQUENCES} (llama.cpp's sequence limit), got {max_sequences!r}"
            )
        if prefill_chunk < 2:
            raise ConfigurationError(f"prefill_chunk must be >= 2, got {prefill_chunk!r}")
        if n_ctx < 16:
            raise ConfigurationError(f"n_ctx must be >= 16, got {n_ctx!r}")
        self._model: int | None = None
        self._ctx: int | None = None
        self._batch: C.llama_batch | None = None
        self.path = resolve_model_path(model_path)
        self.model_id = _model_id(self.path)
        self.n_threads = n_threads or default_threads()
        self.seed = seed & 0xFFFFFFFF
        self._max_batch = max_batch
        self._chunk = prefill_chunk
        self._batch_rows = max_batch + prefill_chunk  # the most rows one step can put in a batch
        self._slots = [_Slot(i) for i in range(sequences)]
        self._live: dict[int, _Sequence] = {}
        self._clock = itertools.count(1)
        self._cell_ids = itertools.count()
        init_backend(verbose)
        model = self._model = load_model(self.path, extra_buffers)
        try:
            self._open_context(model, n_ctx)
        except BaseException:
            self.close()
            raise
        self.vocabulary = Vocabulary(model, remember=4 * max_batch)

    def _open_context(self, model: int, n_ctx: int) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        # One step (a decode row per sequence and one prefill chunk) is one ubatch: llama.cpp
        # never splits it, so a multi-row step never becomes a one-row ubatch with other kernels.
        params.n_batch = params.n_ubatch = self._batch_rows
        params.n_seq_max = len(self._slots)
        params.kv_unified = True  # one pool of n_ctx cells, so seq_cp shares a prefix's cells
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        params.flash_attn_type = FLASH_ATTENTION
        ctx = C.llama_init_from_model(model, params)
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {self.path}{recent_log_text()}")
        self._ctx = ctx
        self._mem = C.llama_get_memory(ctx)
        self.n_ctx: int = C.llama_n_ctx(ctx)
        self._batch = C.llama_batch_init(self._batch_rows, 0, 1)

    # -- what the step loop reads ----------------------------------------------------------

    @property
    def kv_capacity(self) -> int:
        """The cells the scheduler may reserve: ``n_ctx`` less the cells live answers share from
        prefixes no live answer computed (a released answer's system prompt that others still
        use). The scheduler reserves for each answer the rows it computes plus what it may
        generate, not the rows it reused, so those cells must come off the top, or the
        reservations could fill the cache over them and a step find no room (``kv_full``)."""
        return self.n_ctx - self.pinned_cells()

    def pinned_cells(self) -> int:
        """Cells that live answers reuse but no live answer's reservation covers."""
        reused: set[int] = set()
        computed: set[int] = set()
        for sequence in self._live.values():
            cells = sequence.slot.cells
            reused.update(cells[: sequence.reused])
            computed.update(cells[sequence.reused :])
        return len(reused - computed)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def prefill_chunk(self) -> int:
        return self._chunk

    @property
    def max_sequences(self) -> int:
        """Sequences admitted at once (preempted ones included)."""
        return len(self._slots)

    @property
    def live(self) -> int:
        """Sequences admitted and not released."""
        return len(self._live)

    # -- requests --------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise PromptTooLongError / ConfigurationError if ``request`` can never run here
        (prompt + resumed prefix + tokens to generate must fit ``n_ctx``). No work done."""
        self._plan(request)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of ``request``'s prompt for this model (its chat template applied)."""
        self._check_open()
        return len(self.vocabulary.prompt(request))

    def tokens_to_prefill(self, request: GenerationRequest) -> int:
        """Rows ``request`` would compute before its first token, given the cache now (an
        estimate from another thread: the cache may change before it is admitted)."""
        return self.admission(-1, request).prefill_tokens

    def admission(self, seq_id: int, request: GenerationRequest) -> Admission:
        """What admitting ``request`` would take now: the rows it must compute (its target less
        the longest multi-row prefix any slot holds, always at least the last row, whose
        logits it samples from), its prompt's length, the most tokens it may produce."""
        plan = self._plan(request)
        return self._admission(plan, max((s.reusable(plan) for s in self._slots), default=0))

    def admit(self, seq_id: int, request: GenerationRequest) -> Admission:
        """Take ``request`` in as ``seq_id`` in a free slot: the free slot holding the longest
        reusable prefix, else the least recently used one, with the longest prefix any slot
        holds shared into it. Returns what admitting took (the cache may have changed since
        :meth:`admission`)."""
        if seq_id in self._live:
            raise ValueError(f"sequence {seq_id} is already admitted")
        plan = self._plan(request)
        free = [s for s in self._slots if s.owner is None]
        if not free:
            raise AdmissionRefused(f"all {len(self._slots)} sequence slots hold admitted answers (preempted ones included)")
        target = plan.target
        slot = max(free, key=lambda s: (s.reusable(plan), -s.last_used))
        source = max(self._slots, key=lambda s: s.reusable(plan))
        if plan.start >= plan.limit:
            keep = 0  # nothing to generate: it ends at once, computing nothing
        elif source.reusable(plan) > slot.reusable(plan):
            keep = min(source.reusable(plan), len(target) - 1)
            self._forget(slot, 0)
            C.llama_memory_seq_cp(self._mem, source.index, slot.index, 0, keep)
            slot.cached, slot.alone, slot.cells = source.cached[:keep], source.alone[:keep], source.cells[:keep]
        else:
            keep = min(slot.reusable(plan), len(target) - 1)
            self._forget(slot, keep)
        slot.owner = seq_id
        slot.last_used = next(self._clock)
        sampler = make_sampler(request.sampling, self.seed)
        self._live[seq_id] = _Sequence(slot, plan, sampler, PieceStream(request.stop, plan.primer, plan.primer_text), plan.start, reused=keep)
        return self._admission(plan, keep)

    def release(self, seq_id: int) -> None:
        """Forget the sequence; its slot keeps the cells for later prefix reuse."""
        sequence = self._live.pop(seq_id, None)
        if sequence is None:
            return
        C.llama_sampler_free(sequence.sampler)
        sequence.slot.owner = None
        sequence.slot.last_used = next(self._clock)

    def clear(self) -> None:
        """Forget every cached row (nothing may be live): the next requests start cold."""
        if self._live:
            raise RuntimeError("clear() with sequences still admitted")
        self._check_open()
        C.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.cached, slot.alone, slot.cells = [], [], []

    # -- one step --------------------------------------------------------------------------

    def step(self, decode: Sequence[int], prefill: tuple[int, int] | None) -> list[StepEvent]:
        """One step, one ``llama_batch``: a row for each of ``decode`` (its last token), and up
        to ``prefill[1]`` rows of ``prefill[0]``'s prompt and resumed prefix. Returns each
        sequence's new token (a finished prefill samples the first one) and its end.

        Resumed answer rows are computed as generation computes answer rows: in the batch when
        others decode beside them, else one ``llama_decode`` of one row each (as a sequence
        decoding alone, and ``LlamaEngine``, computes them), so a resume in a batch of one is
        exact."""
        self._check_open()
        if len(decode) > self._max_batch or (prefill is not None and prefill[1] > self._chunk):
            raise ValueError(f"a step holds at most {self._max_batch} decodes and a prefill chunk of {self._chunk} rows")
        events: list[StepEvent] = []
        rows: list[_Row] = []
        for seq_id in decode:
            sequence = self._sequence(seq_id)
            if sequence.position >= sequence.plan.limit:  # resumed at max_tokens: nothing to do
                events.append(StepEvent(seq_id, finish="length"))
            elif sequence.pending is None:
                raise ValueError(f"sequence {seq_id} cannot decode: its prefill is not done")
            else:
                rows.append(_Row(sequence, sequence.pending, len(sequence.slot.cached), samples=True))
        one_by_one: list[_Row] = []
        if prefill is not None:
            batched, one_by_one = self._prefill_rows(prefill, beside_decodes=bool(rows))
            rows += batched
        if rows:
            self._decode(rows)
            events += self._sample(rows)
        for row in one_by_one:
            self._decode([row])
            events += self._sample([row])
        return events

    def _prefill_rows(self, prefill: tuple[int, int], *, beside_decodes: bool) -> tuple[list[_Row], list[_Row]]:
        """The rows of a prefill chunk: those for the step's batch, and resumed answer rows to
        compute one by one after it (when no decode rows are beside them)."""
        seq_id, count = prefill
        sequence = self._sequence(seq_id)
        plan, slot = sequence.plan, sequence.slot
        start = len(slot.cached)
        if not sequence.prefilling or count < 1:
            raise ValueError(f"sequence {seq_id} has no prefill of {count} rows left")
        end = min(len(plan.target), start + count)
        split = end if beside_decodes else max(start, min(end, len(plan.prompt)))
        if not beside_decodes and split - start == 1 and start > 0:
            # A lone prompt row would take other kernels than the multi-row batch its
            # uninterrupted run computes it in: compute it beside the row before it (again).
            start -= 1
            self._forget(slot, start)
        rows = [_Row(sequence, plan.target[i], i, samples=i == len(plan.target) - 1) for i in range(start, end)]
        return rows[: split - start], rows[split - start :]

    def _decode(self, rows: list[_Row]) -> None:
        batch = self._batch
        assert batch is not None
        for i, row in enumerate(rows):
            slot = row.sequence.slot
            batch.token[i] = row.token
            batch.pos[i] = row.position  # type: ignore[call-overload]  # the binding mistypes pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.index
            batch.logits[i] = row.samples
        batch.n_tokens = len(rows)
        while True:
            rc = C.llama_decode(self._ctx, batch)
            if rc != DECODE_NO_SLOT or not self._give_up_kept_cells():
                break
        if rc == DECODE_NO_SLOT:
            # With every idle slot's cells given up, the live sequences alone fill the cache,
            # although the reservations (kv_capacity, the step loop's admission check) fit:
            # llama.cpp found no room for this batch (docs/device.md, "Prefix sharing").
            raise EndpointError(
                f"the KV cache ({self.n_ctx} cells) is full with the {len(self._live)} answers admitted "
                "and the prefixes they share", code="kv_full",
            )  # fmt: skip
        if rc != 0:
            raise EndpointError(f"llama_decode failed with code {rc} on a batch of {len(rows)} rows{recent_log_text()}", code="decode_failed")
        for row in rows:
            row.sequence.slot.cached.append(row.token)
            row.sequence.slot.alone.append(len(rows) == 1)
            row.sequence.slot.cells.append(next(self._cell_ids))

    def _give_up_kept_cells(self) -> bool:
        """Free the cells of the idle slot least recently used (the cache is full); False when
        no idle slot holds any."""
        idle = [s for s in self._slots if s.owner is None and s.cached]
        if not idle:
            return False
        self._forget(min(idle, key=lambda s: s.last_used), 0)
        return True

    def _sample(self, rows: list[_Row]) -> list[StepEvent]:
        events: list[StepEvent] = []
        for i, row in enumerate(rows):
            if not row.samples:
                continue
            sequence = row.sequence
            seq_id = sequence.slot.owner
            assert seq_id is not None
            token = C.llama_sampler_sample(sequence.sampler, self._ctx, i)
            sequence.pending = None
            if self.vocabulary.is_end(token):
                events += [StepEvent(seq_id, piece) for piece in sequence.stream.flush()]
                events.append(StepEvent(seq_id, finish="stop"))
                continue
            pieces, stopped = sequence.stream.push(sequence.position, token, self.vocabulary.piece(token))
            sequence.position += 1
            events += [StepEvent(seq_id, piece) for piece in pieces]
            if stopped:
                events.append(StepEvent(seq_id, finish="stop"))
            elif sequence.position >= sequence.plan.limit:
                events += [StepEvent(seq_id, piece) for piece in sequence.stream.flush()]
                events.append(StepEvent(seq_id, finish="length"))
            else:
                sequence.pending = token
        return events

    # -- bookkeeping -----------------------------------------------------------------------

    def _plan(self, request: GenerationRequest) -> Plan:
        self._check_open()
        return self.vocabulary.plan(request, self.n_ctx)

    def _admission(self, plan: Plan, keep: int) -> Admission:
        if plan.start >= plan.limit:
            return Admission(0, len(plan.prompt), 0)
        keep = min(keep, len(plan.target) - 1)
        return Admission(len(plan.target) - keep, len(plan.prompt), plan.limit - plan.start)

    def _sequence(self, seq_id: int) -> _Sequence:
        try:
            return self._live[seq_id]
        except KeyError:
            raise ValueError(f"sequence {seq_id} is not admitted") from None

    def _forget(self, slot: _Slot, start: int) -> None:
        """Drop ``slot``'s rows from position ``start`` on (cells another slot shares stay)."""
        if len(slot.cached) > start and not C.llama_memory_seq_rm(self._mem, slot.index, start, -1):
            C.llama_memory_seq_rm(self._mem, slot.index, 0, -1)
            start = 0
        del slot.cached[start:]
        del slot.alone[start:]
        del slot.cells[start:]

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("this BatchedEngine is closed")

    def close(self) -> None:
        """Free the samplers, the context and the model. Idempotent."""
        for seq_id in list(self._live):
            self.release(seq_id)
        free_handles(self._batch, self._ctx, self._model)
        self._batch = self._ctx = self._model = None

    def __enter__(self) -> BatchedEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
