"""Pieces shared by the tests that build tiny diffusers/transformers models from configs."""

from __future__ import annotations

import json
import string
from pathlib import Path


def write_clip_tokenizer(folder: Path, merges: tuple[str, ...] = ()) -> Path:
    """A CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``) over single characters, plus the tokens the given
    BPE ``merges`` make ("c a" -> "ca"): every lowercase word splits into known pieces.

    Load it with ``CLIPTokenizer.from_pretrained(folder, model_max_length=77)``."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["<|startoftext|>", "<|endoftext|>", "!"] + list(string.ascii_lowercase + string.digits)
    pieces += [c + "</w>" for c in string.ascii_lowercase + string.digits]
    pieces += ["".join(m.split()) for m in merges]
    (folder / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return folder
