"""A model's vocabulary as both device engines use it: text <-> tokens, a request's prompt
(chat template applied, tokenised once), and a request checked and planned (``Plan``)."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import threading
from collections.abc import Sequence

from llama_cpp import llama_cpp as C

from .._errors import ConfigurationError, PromptTooLongError
from .._types import GenerationRequest
from ._text import ChatTemplate


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
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


class Vocabulary:
    """The vocabulary of ``model`` (a llama_model pointer, which must outlive this).

    ``prompt`` keeps the tokens of the last ``remember`` prompts, keyed by content: one request
    is counted, planned, validated and run (from two threads), and its resumes share its prompt.
    """

    def __init__(self, model: int, *, remember: int = 1) -> None:
        self._vocab = C.llama_model_get_vocab(model)
        self.n_vocab: int = C.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self.chat = ChatTemplate.from_model(model, self.token_text)
        self._prompts: collections.OrderedDict[object, list[int]] = collections.OrderedDict()
        self._remember = max(1, remember)
        self._lock = threading.Lock()

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
        """The bytes of ``ids`` exactly as the engines report them (control tokens render empty)."""
        return b"".join(self.piece(i) for i in ids)

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def token_text(self, token: int) -> str:
        """A special token's name as written in templates, e.g. ``<|im_start|>``."""
        return bytes(C.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends the text (end of generation)."""
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens (not to be mutated): the chat template applied to ``messages``,
        or the raw ``prompt`` with BOS when the model wants one and special tokens parsed."""
        source: object = (
            tuple(tuple(sorted(m.items())) for m in request.messages) if request.messages is not None else request.prompt
        )
        with self._lock:
            known = self._prompts.get(source)
            if known is not None:
                self._prompts.move_to_end(source)
                return known
        if request.messages is not None:
            text = self.chat.render(request.messages)
            add_bos = self._add_bos and not self.chat.has_bos(text)  # the template may write it
            tokens = self.tokenize(text, add_special=add_bos, parse_special=True)
        else:
            assert request.prompt is not None
            tokens = self.tokenize(request.prompt, add_special=True, parse_special=True)
        with self._lock:
            self._prompts[source] = tokens
            while len(self._prompts) > self._remember:
                self._prompts.popitem(last=False)
        return tokens

    def plan(self, request: GenerationRequest, n_ctx: int) -> Plan:
        """``request`` checked against this model and a context of ``n_ctx`` tokens: raises
        ConfigurationError (bad stop strings, seed, resume ids, an empty prompt) or
        PromptTooLongError (prompt + resumed prefix + tokens to generate > ``n_ctx``)."""
        for stop in request.stop:
            if not stop:
                raise ConfigurationError("stop strings must be non-empty")
        if not 0 <= request.sampling.seed <= 0xFFFFFFFF:
            raise ConfigurationError(f"sampling seed must fit 32 bits, got {request.sampling.seed!r}")
        if request.resume_position is not None and request.resume_position < 0:
            raise ConfigurationError(f"resume_position must be >= 0, got {request.resume_position!r}")
        prompt = self.prompt(request)
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
        if needed > n_ctx:
            raise PromptTooLongError(
                f"prompt ({len(prompt)} tokens) + resumed prefix ({len(prefix)}) + tokens to generate "
                f"({to_generate}) = {needed} exceeds the context of {n_ctx} tokens"
            )
        primer_text = primer.decode("utf-8", "replace")
        return Plan(prompt, prefix, primer, primer_text, start, request.max_tokens)
