"""Stage 3, ``extract``: foreground objects, the predominant background and an alternative background
per (caption, label), ignoring the class itself.

ASPIRE Sec. 2(3) and Appendix A.6 (https://arxiv.org/abs/2308.10103). Backends (``extract.backend``):
``openai`` (:mod:`tasks.extract_openai`, any OpenAI-compatible server) and ``rules`` (:mod:`tasks.extract_rules`,
offline). Both see only captions that are not in the per-caption cache, so a rerun sends no request.

Columns added: ``foreground`` (list[str]), ``background`` (str, "" when none), ``alt`` (str),
``label_phrases_dropped`` (int), ``extract_error`` (reason, or None when the extraction succeeded).

A failed caption (the server's 429/5xx/timeouts after the SDK's retries, a malformed answer after the repairs)
is not final: its shard is committed with the stat ``retryable`` (:func:`aspire.cache.retry_pending`), so the
run goes on, and the next run asks for exactly those captions again. When more than ``extract.max_failed`` of
the captions failed, the stage stops the run instead (``StageFailed``): nothing downstream is built on it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Protocol

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from aspire.cache import RETRYABLE, ShardResult, StageStore
from aspire.config import ExtractConfig
from aspire.lazy import porter_stemmer
from aspire.manifest import Row, digest
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "extract"
VERSION = 1
PROMPTS = Path(__file__).resolve().parents[1] / "prompts"


class ExtractItem(BaseModel):
    """One (caption, label) pair to extract from; ``id`` maps the answer back to its row."""

    id: str
    caption: str
    label: str


class Extraction(BaseModel):
    """What a backend returns for one item."""

    foreground: list[str] = Field(default_factory=list)
    background: str = ""
    alt: str = ""


class BatchResult(BaseModel):
    """A backend's answer for a batch: extractions and failure reasons by item id, and usage counters."""

    extractions: dict[str, Extraction] = Field(default_factory=dict)
    failures: dict[str, str] = Field(default_factory=dict)
    usage: dict[str, int] = Field(default_factory=dict)


class Extractor(Protocol):
    """A backend. ``identity`` names everything its answers depend on (backend, model, prompt digest, ...)."""

    identity: str

    def extract(self, items: list[ExtractItem]) -> BatchResult: ...


def prompt_file(name: str) -> Path:
    """A file in ``prompts/`` by name, or a path; raises naming the file when it does not exist."""
    path = PROMPTS / name if (PROMPTS / name).is_file() else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {name!r} not found (looked in {PROMPTS})")
    return path


# -- naming the label ---------------------------------------------------------------------------------------


def stems(text: str) -> list[str]:
    """Lowercase word stems (Porter, no downloaded data needed)."""
    return [porter_stemmer().stem(w) for w in re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))]


def label_forms(class_name: str, synonyms: list[str] = ()) -> list[list[str]]:
    """Stem sequences that name a class: its name (a leading ``not`` dropped) and its synonyms."""
    forms = [stems(class_name)]
    if forms[0][:1] == ["not"] and len(forms[0]) > 1:
        forms[0] = forms[0][1:]
    forms += [stems(s) for s in synonyms]
    return [f for f in forms if f]


def names_label(phrase: str, forms: list[list[str]]) -> bool:
    """Whether the phrase contains one of the label's stem sequences ("two dogs" names "dog")."""
    words = stems(phrase)
    return any(words[i : i + len(f)] == f for f in forms for i in range(len(words) - len(f) + 1))


# -- per-caption cache -----------------------------------------------------------------------------------------


class CaptionCache:
    """One JSON file per (extractor identity, caption, label): reruns and other stage keys reuse answers."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, identity: str, item: ExtractItem) -> Path:
        key = digest({"extractor": identity, "caption": item.caption, "label": item.label})
        return self.folder / key[:2] / f"{key}.json"

    def get(self, identity: str, item: ExtractItem) -> Extraction | None:
        try:
            return Extraction.model_validate_json(self._path(identity, item).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def put(self, identity: str, item: ExtractItem, extraction: Extraction) -> None:
        path = self._path(identity, item)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(extraction.model_dump_json())
        os.replace(tmp, path)


# -- the stage ----------------------------------------------------------------------------------------------


def run_extract(rows: list[Row], config: ExtractConfig, extractor: Extractor, cache: CaptionCache) -> ShardResult:
    """Extract phrases for every row with a caption; rows without one, or whose extraction failed, keep
    an ``extract_error`` reason. Phrases naming the row's class are dropped from ``foreground`` and counted.
    """
    items = {r["image_id"]: ExtractItem(id=r["image_id"], caption=r.get("caption") or "", label=r["class_name"])
             for r in rows}
    found = {i: e for i, item in items.items() if item.caption and (e := cache.get(extractor.identity, item))}
    todo = [item for i, item in items.items() if item.caption and i not in found]
    batch = extractor.extract(todo) if todo else BatchResult()
    answered = {i: e for i, e in batch.extractions.items() if i in items}  # ids never asked for are ignored
    for item_id, extraction in answered.items():
        cache.put(extractor.identity, items[item_id], extraction)
    found.update(answered)

    out, dropped_total = [], 0
    for row in rows:
        extraction = found.get(row["image_id"])
        if extraction is None:
            reason = batch.failures.get(row["image_id"]) or ("no caption" if not items[row["image_id"]].caption
                                                             else "no answer for this item")
            out.append({**row, "foreground": [], "background": "", "alt": "", "label_phrases_dropped": 0,
                        "extract_error": reason})
            continue
        forms = label_forms(row["class_name"], config.synonyms.get(row["class_name"], []))
        kept = [p for p in extraction.foreground if not names_label(p, forms)]
        dropped_total += len(extraction.foreground) - len(kept)
        out.append({**row, "foreground": kept, "background": extraction.background, "alt": extraction.alt,
                    "label_phrases_dropped": len(extraction.foreground) - len(kept), "extract_error": None})
    stats = {"cached": len(found) - len(answered), "extracted": len(answered),
             "failed": sum(r["extract_error"] is not None for r in out), "label_phrases_dropped": dropped_total,
             # a failed caption (server error, timeout, malformed answer) is asked again on the next run
             RETRYABLE: sum(r["extract_error"] is not None and bool(items[r["image_id"]].caption) for r in out),
             **batch.usage}
    return ShardResult(out, [], stats)


_extractors: dict[str, Extractor] = {}
_lock = threading.Lock()


def load_extractor(config: ExtractConfig) -> Extractor:
    """The configured backend, built once per worker process."""
    key = config.model_dump_json()
    with _lock:
        if key not in _extractors:
            if config.backend == "rules":
                from tasks.extract_rules import RulesExtractor

                _extractors[key] = RulesExtractor(config)
            else:
                from tasks.extract_openai import OpenAIExtractor

                _extractors[key] = OpenAIExtractor(config)
        return _extractors[key]


def extractor_identity(config: ExtractConfig) -> str:
    """The backend's identity without building it (no API key needed): part of the stage key."""
    if config.backend == "rules":
        from tasks.extract_rules import rules_identity

        return rules_identity(config)
    from tasks.extract_openai import openai_identity

    return openai_identity(config)


@task(name="extract-shard", task_run_name="extract-shard-{index}", cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def extract_shard_task(store: StageStore, index: int, rows: list[Row], config: ExtractConfig, cache_dir: Path) -> dict:
    """Extract one shard and commit it (skipped when already committed)."""
    extractor = load_extractor(config)
    return store.ensure_shard(index, rows, lambda shard_rows, _: run_extract(shard_rows, config, extractor,
                                                                              CaptionCache(cache_dir)))
