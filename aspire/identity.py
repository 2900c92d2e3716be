"""What a model-backed backend's outputs depend on, computed without loading the model.

A hub id stands for itself. A local folder or file is digested cheaply: small text files (configs, tokenizer
files) in full, weight files by their size and first and last MiB, so that multi-GB checkpoints hash in
milliseconds yet any retrained or replaced weights change the digest (and so the stage key).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

TEXT_SUFFIXES = (".json", ".txt", ".model", ".py", ".yaml", ".yml")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MIB = 1 << 20


def expand_ref(value: str | Path) -> str:
    """A model reference as given to ``from_pretrained``: a leading ``~`` expanded, anything else as is."""
    return str(Path(value).expanduser()) if str(value).startswith("~") else str(value)


def _update(h: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_MIB)
        f.seek(max(0, size - _MIB))
        h.update(f"{size}\0".encode() + head + f.read())


def weights_digest(path: str | Path) -> str:
    """Digest of a weight file's size and first and last MiB."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()[:16]


def folder_digest(folder: str | Path) -> str:
    """Digest of a local model folder: text files in full, weight files by size and first/last MiB."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix in TEXT_SUFFIXES:
            h.update(f"{name}\0".encode() + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            h.update(f"{name}\0".encode())
            _update(h, path)
    return h.hexdigest()[:16]


def model_identity(value: str | Path) -> str:
    """``<hub id>`` as is, or ``<absolute folder>@<folder digest>`` for a local folder."""
    folder = Path(expand_ref(value))
    return f"{folder.resolve()}@{folder_digest(folder)}" if folder.is_dir() else str(value)
