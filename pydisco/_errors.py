"""pydisco's exception vocabulary. Trio's own (Cancelled, BrokenResourceError, ...) is reused
where it already says the thing; these add what it does not."""

from __future__ import annotations

import trio


class PydiscoError(Exception):
    """Base class of pydisco's own errors."""


class ConfigurationError(PydiscoError, ValueError):
    """Invalid parameters or configuration, detected before any work starts."""


class ModelError(PydiscoError):
    """A model file is missing, unreadable or not a GGUF model."""


class PromptTooLongError(ConfigurationError):
    """The prompt (plus resumed prefix and max_tokens) does not fit the model's context."""


class EndpointError(PydiscoError):
    """An endpoint failed while generating. ``code`` is a stable machine-readable name."""

    def __init__(self, message: str, *, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class EndpointUnavailable(EndpointError, trio.BrokenResourceError):
    """The endpoint cannot be reached or went away mid-answer (link lost, server restarted).

    The committed prefix is intact; the runtime fails over or the caller resumes elsewhere.
    """


class AuthenticationError(EndpointError):
    """The server refused the credentials. Nothing was generated."""


class MissingExtraError(ConfigurationError, ImportError):
    """A feature needs an optional part of pydisco that this install lacks (``extra`` names
    it: ``pip install 'pydisco[extra]'``). Also an ImportError, as a missing module is."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what}, which this install lacks: pip install 'pydisco[{extra}]'")
        self.extra = extra
