"""Heavy libraries imported on first use, so commands that only read markers (``aspire status``, ``--help``,
preflight) do not pay torch's, torchvision's and nltk's seconds of import time.

``from aspire.lazy import torch`` gives a stand-in whose first attribute access imports the real module (the
module itself, not a copy: ``torch.Tensor``, ``torch.no_grad()`` are the real ones). Nothing is put in
``sys.modules`` before that import, so ``import torch`` elsewhere behaves as always.
"""

from __future__ import annotations

import importlib
import re
import sys
from functools import lru_cache
from importlib.metadata import distribution
from types import ModuleType
from typing import Any


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch: ModuleType = LazyModule("torch")  # type: ignore[assignment]
torchvision: ModuleType = LazyModule("torchvision")  # type: ignore[assignment]


def library_version(name: str) -> str:
    """``torch.__version__`` (with its build tag, e.g. ``2.14.1+cu130``) without importing ``torch``: read from
    the package's ``version.py`` (torch and torchvision write it), else the installed distribution's version."""
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    dist = distribution(name)
    path = dist.locate_file(f"{name}/version.py")
    try:
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", open(path, encoding="utf-8").read(), re.M)
    except OSError:
        found = None
    return found.group(1) if found else dist.version


@lru_cache(maxsize=1)
def porter_stemmer():
    """nltk's Porter stemmer (importing nltk pulls in scipy.stats: about 1.5 s)."""
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def resolve_device(name: str) -> "torch.device":
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
