"""pydisco: an embedded runtime that streams an LLM's answer with an on-device and a cloud model
working together."""

from __future__ import annotations

__version__ = "0.1.0"
