"""Text out of tokens and into prompts, as both device engines do it: ``PieceStream`` (whole
UTF-8 characters per token, stop strings cut off) and ``ChatTemplate`` (the model's own Jinja
chat template, rendered in a sandbox)."""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jinja2.sandbox
from llama_cpp import llama_cpp as C

from .._errors import ConfigurationError, ModelError
from .._types import TokenPiece


class PieceStream:
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
        keep = max((overlap(text, s) for s in self._stops), default=0)
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


def overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class ChatTemplate:
    """The model's own chat template (Jinja, as in Hugging Face), rendered in a sandbox."""

    template: jinja2.Template | None
    bos: str
    eos: str

    @classmethod
    def from_model(cls, model: int, token_text: Callable[[int], str]) -> ChatTemplate:
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
