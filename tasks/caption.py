"""Stage 2, ``caption``: describe every held-out image in words.

ASPIRE Sec. 2(2) (https://arxiv.org/abs/2308.10103): "we use an image captioning model to generate a caption
for each image in the held-out set"; the paper uses GIT (Wang et al., 2022). Backends (``caption.backend``):

- ``git``: transformers GIT (``AutoProcessor`` + ``AutoModelForCausalLM``), e.g. ``microsoft/git-large-coco``.
- ``blip``: transformers BLIP (``AutoProcessor`` + ``BlipForConditionalGeneration``).
- ``metadata``: the manifest's own ``caption`` column (datasets that ship captions; no model).

Columns added: ``caption`` (str, the new caption), ``caption_backend`` (str) and, for the model backends,
``caption_original`` (the manifest's caption before this stage, or ``None``). Rows whose image does not load
(or, for ``metadata``, that have no caption) go to the quarantine.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from aspire.cache import ShardResult, StageStore
from aspire.lazy import resolve_device, torch
from aspire.config import CaptionConfig
from aspire.identity import expand_ref, model_identity
from aspire.images import ImageError, load_rgb
from aspire.manifest import Row
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "caption"
VERSION = 1
BACKENDS = ("git", "blip", "metadata")
DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names
@dataclass(frozen=True)
class Skipped:
    """A row a captioner could not caption, and why (becomes a quarantine record)."""

    reason: str


class Captioner(Protocol):
    """A backend. ``identity`` names everything its captions depend on (backend, model and its files)."""

    identity: str
    backend: str
    batch_size: int

    def caption_rows(self, rows: list[Row]) -> list[str | Skipped]:
        """One caption (stripped) or :class:`Skipped` per row, in order."""
        ...


# -- identity ------------------------------------------------------------------------------------------------


def captioner_identity(config: CaptionConfig) -> str:
    """What the stage key records about the backend, without loading the model.

    ``metadata``; ``<backend>:<hub id>``; or ``<backend>:<absolute folder>@<digest of its files>`` for a local
    folder, so that replacing a local model changes the identity.

    Raises:
        ValueError: unknown ``caption.backend``.
    """
    if config.backend not in BACKENDS:
        raise ValueError(f"caption.backend={config.backend!r}: expected one of {', '.join(BACKENDS)}")
    if config.backend == "metadata":
        return "metadata"
    return f"{config.backend}:{model_identity(config.model)}"


# -- backends ------------------------------------------------------------------------------------------------


def _check_model_config(config: CaptionConfig) -> torch.device:
    """Validate ``caption.model``/``dtype``/``device`` up front; returns the device.

    Raises:
        ValueError: a path-like ``caption.model`` that does not exist, or float16 on a CPU.
    """
    model = expand_ref(config.model)
    looks_like_path = model.startswith(("/", ".")) or Path(model).exists()
    if looks_like_path and not Path(model).is_dir():
        raise ValueError(f"caption.model={config.model!r}: no such folder (expected a local model folder or a hub id)")
    device = resolve_device(config.device)
    if device.type == "cpu" and config.dtype == "float16":
        raise ValueError(f"caption.dtype='float16' on device {device}: half precision needs a GPU (use float32 "
                         "or bfloat16 on a CPU)")
    return device


def _from_pretrained(loader, config: CaptionConfig, **kwargs):
    """``loader.from_pretrained(caption.model, ...)`` with transformers' errors turned into one naming the key."""
    try:
        return loader.from_pretrained(expand_ref(config.model), **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"caption.model={config.model!r}: cannot load {getattr(loader, '__name__', loader)} "
                         f"as a local folder or hub id ({type(exc).__name__}: {exc})") from exc


class _ModelCaptioner:
    """Shared part of the transformers backends: load images, batch, generate, decode.

    Subclasses set ``backend`` and ``_model_class()``.
    """

    backend = ""

    def __init__(self, config: CaptionConfig) -> None:
        from transformers import AutoProcessor

        self.config = config
        self.batch_size = config.batch_size
        self.device = _check_model_config(config)
        self.identity = captioner_identity(config)
        self.processor = _from_pretrained(AutoProcessor, config)
        model = _from_pretrained(self._model_class(), config, dtype=getattr(torch, config.dtype))
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()  # one generate() at a time per worker: bounded GPU memory
        log.info("caption: loaded %s on %s (%s)", self.identity, self.device, config.dtype)

    @staticmethod
    def _model_class():
        raise NotImplementedError

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Captions (stripped) for RGB images, one ``generate`` call."""
        if not images:
            return []
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, getattr(torch, self.config.dtype))  # (B, 3, H, W)
        with self._lock, torch.inference_mode():
            tokens = self.model.generate(pixel_values=pixel_values, max_length=self.config.max_length,
                                         num_beams=self.config.num_beams)  # (B, <= max_length)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def caption_rows(self, rows: list[Row]) -> list[str | Skipped]:
        """Load each row's image (unloadable ones are :class:`Skipped` with the reason) and caption the rest."""
        results: list[str | Skipped] = []
        images: list[Image.Image] = []
        for row in rows:
            try:
                if not row.get("path"):
                    raise ImageError("", "no path in the manifest")
                images.append(load_rgb(row["path"]))
                results.append("")
            except ImageError as exc:
                results.append(Skipped(exc.reason))
        captions = iter(self.caption(images))
        return [next(captions) if isinstance(r, str) else r for r in results]


class GitCaptioner(_ModelCaptioner):
    """GIT (Wang et al., 2022, https://arxiv.org/abs/2205.14100), ASPIRE's captioner (Sec. 2(2))."""

    backend = "git"

    @staticmethod
    def _model_class():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


class BlipCaptioner(_ModelCaptioner):
    """BLIP (Li et al., 2022, https://arxiv.org/abs/2201.12086) unconditional captioning."""

    backend = "blip"

    @staticmethod
    def _model_class():
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration


class MetadataCaptioner:
    """The manifest's existing ``caption`` column, for datasets that ship captions (no model, no images)."""

    backend = "metadata"
    identity = "metadata"

    def __init__(self, config: CaptionConfig) -> None:
        self.batch_size = config.batch_size

    def caption_rows(self, rows: list[Row]) -> list[str | Skipped]:
        return [c.strip() if isinstance(c := row.get("caption"), str) and c.strip()
                else Skipped("no caption in the manifest") for row in rows]


_captioners: dict[str, Captioner] = {}
_lock = threading.Lock()


def load_captioner(config: CaptionConfig) -> Captioner:
    """The configured backend, built once per worker process (same config, same object).

    Raises:
        ValueError: unknown ``caption.backend``; ``caption.model`` not loadable (naming the value).
    """
    classes = {"git": GitCaptioner, "blip": BlipCaptioner, "metadata": MetadataCaptioner}
    if config.backend not in classes:
        raise ValueError(f"caption.backend={config.backend!r}: expected one of {', '.join(classes)}")
    key = config.model_dump_json()
    with _lock:
        if key not in _captioners:
            _captioners[key] = classes[config.backend](config)
        return _captioners[key]


# -- the stage -----------------------------------------------------------------------------------------------


def _captioned_row(row: Row, text: str, backend: str) -> Row:
    """The row with the new caption; a model backend keeps a previous non-empty caption in ``caption_original``."""
    out = {**row, "caption": text, "caption_backend": backend}
    if backend != "metadata" and "caption_original" not in row:
        old = row.get("caption")
        out["caption_original"] = old if isinstance(old, str) and old.strip() else None
    return out


def run_caption(rows: list[Row], captioner: Captioner) -> ShardResult:
    """Caption every row given (the flow passes the held-out rows), in batches of ``captioner.batch_size``.

    Returns:
        Rows with ``caption``/``caption_backend`` (and ``caption_original``), quarantine records
        ``{image_id, path, reason}`` for rows that could not be captioned, and stats ``captioned``,
        ``seconds`` (summed over shards by the flow).
    """
    start = time.perf_counter()
    out: list[Row] = []
    quarantine: list[Row] = []
    batches = [rows[i : i + captioner.batch_size] for i in range(0, len(rows), captioner.batch_size)]
    for batch in tqdm(batches, desc="caption", unit="batch", leave=False, disable=None):
        for row, result in zip(batch, captioner.caption_rows(batch), strict=True):
            if isinstance(result, Skipped):
                quarantine.append({"image_id": row["image_id"], "path": row.get("path"), "reason": result.reason})
                log.warning("caption: quarantined %s (%s): %s", row["image_id"], row.get("path"), result.reason)
            else:
                out.append(_captioned_row(row, result, captioner.backend))
    seconds = time.perf_counter() - start
    log.info("caption: %d captioned, %d quarantined in %.2f s", len(out), len(quarantine), seconds)
    stats = {"captioned": len(out), "seconds": round(seconds, 3)}  # summed over shards by the flow
    return ShardResult(out, quarantine, stats)


@task(name="caption-shard", task_run_name="caption-shard-{index}", tags=["gpu"], cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def caption_shard_task(store: StageStore, index: int, rows: list[Row], config: CaptionConfig) -> dict:
    """Caption one shard with the worker's captioner and commit it (skipped when already committed)."""
    captioner = load_captioner(config)
    return store.ensure_shard(index, rows, lambda shard_rows, _: run_caption(shard_rows, captioner))
