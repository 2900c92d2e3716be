"""Stage ``background`` (ASPIRE step 4b): turn the predominant background into the alternative one and see
whether the prediction flips.

ASPIRE Sec. 2(4.b) and A.6 (https://arxiv.org/abs/2308.10103). Backends: ``instruct-pix2pix``
(:mod:`tasks.instruct_pix2pix`, "turn the background from {background} to {alt}") and ``composite`` (this
module: the image's foreground, found by the remove stage's grounder and segmenter, pasted on an image of
the alternative background from a bank with one folder per background name; when the bank has no images of
the proposed alternative, a bank background that *looks* unlike the image's own background (colour statistics
of the pixels around the foreground, not names, which need not share a word) is used and recorded as
``alt_used``).

Output: the input rows unchanged plus one attempt row per held-out image (``source="edit-background"``,
``phrase`` = the original background, ``alt``), with the same keep rule and fields as the remove stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from aspire.cache import ShardResult, StageStore
from aspire.config import BackgroundConfig, RemoveConfig
from aspire.images import ImageError, load_rgb
from aspire.manifest import Row, digest
from aspire.phrases import BowEmbedder, normalize_phrase
from aspire.readers import IMAGE_EXTENSIONS
from tasks.remove import attempt_row, attempt_stats, classify_and_keep, is_edit, load_for_editing
from tasks.vision import BackgroundEditor, Grounder, Segmenter
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "background"
VERSION = 3
EDIT_SOURCE = "edit-background"


class BackgroundBank:
    """Images of backgrounds, one folder per background name (``<bank>/<name>/*.png``)."""

    def __init__(self, root: Path) -> None:
        if root is None or not Path(root).is_dir():
            raise ValueError(f"background.bank={str(root)!r}: expected a folder with one sub-folder per background")
        self.root = Path(root)
        self.folders = {normalize_phrase(p.name.replace("_", " ")): p for p in sorted(self.root.iterdir()) if p.is_dir()}
        self._folder_stats: dict[str, np.ndarray] = {}
        self.identity = f"bank:{self.root.name}:" + digest(sorted(
            (str(f.relative_to(self.root)), f.stat().st_size) for f in self.root.rglob("*") if f.is_file()))

    def folder(self, name: str) -> Path | None:
        """The folder of ``name``: same normalised name, else the most similar name (bag of stems >= 0.5)."""
        wanted = normalize_phrase(name)
        if wanted in self.folders:
            return self.folders[wanted]
        if not self.folders:
            return None
        names = list(self.folders)
        sims = BowEmbedder().embed(names + [wanted])
        scores = sims[:-1] @ sims[-1]
        best = int(np.argmax(scores))
        return self.folders[names[best]] if scores[best] >= 0.5 else None

    def pick(self, name: str, key: str) -> Path | None:
        """A deterministic image of background ``name`` for the row ``key``."""
        folder = self.folder(name)
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if folder else []
        return files[int(digest(key), 16) % len(files)] if files else None

    def _stats(self, name: str) -> np.ndarray:
        """Mean and standard deviation of each colour channel over the folder's images (6 numbers, 0-255)."""
        if name not in self._folder_stats:
            files = sorted(f for f in self.folders[name].iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            pixels = np.concatenate([np.asarray(load_rgb(f).resize((32, 32)), dtype=np.float32).reshape(-1, 3)
                                     for f in files[:8]]) if files else np.zeros((1, 3), np.float32)
            self._folder_stats[name] = np.concatenate([pixels.mean(0), pixels.std(0)])
        return self._folder_stats[name]

    def unlike(self, pixels: np.ndarray, key: str) -> str | None:
        """A bank background that looks unlike ``pixels`` ((N, 3) RGB of the image's own background).

        The folders are ranked by the distance of their colour statistics to the pixels'; those within a quarter
        of the range from the nearest (the same kind of scene) are excluded, and one of the rest is chosen
        deterministically for ``key``."""
        names = list(self.folders)
        if not names:
            return None
        pixels = pixels.astype(np.float32).reshape(-1, 3)
        own = np.concatenate([pixels.mean(0), pixels.std(0)])
        distance = np.array([np.linalg.norm(self._stats(n) - own) for n in names])
        cut = distance.min() + 0.25 * (distance.max() - distance.min())
        others = [n for n, d in zip(names, distance) if d > cut]
        return others[int(digest(key), 16) % len(others)] if others else None


class CompositeEditor:
    """Paste the foreground (class object + foreground phrases, grounded and segmented) on a bank image.

    The segments are pasted as they are, with no ring of the original background around them: InstructPix2Pix
    redraws the background up to the object, and a ring of two pixels (the rim this editor kept until
    ``VERSION`` 3) was enough for a small CNN to keep following the old background (BENCHMARKS.md, 2026-12-07)."""

    def __init__(self, config: BackgroundConfig, grounder: Grounder, segmenter: Segmenter) -> None:
        self.bank = BackgroundBank(config.bank)
        self.grounder, self.segmenter = grounder, segmenter
        self.identity = f"composite:{self.bank.identity}:{grounder.identity}:{segmenter.identity}"

    def edit_one(self, image: Image.Image, background: str, alt: str, row: Row) -> Image.Image | str:
        phrases = [row["class_name"].replace("_", " "), *(row.get("foreground") or [])]
        detections = self.grounder.ground(image, phrases, row)
        if not detections:
            return "no foreground found to paste"
        mask = np.zeros((image.height, image.width), dtype=bool)
        for m in self.segmenter.segment(image, [d.box for d in detections]):
            mask |= m
        pixels = np.asarray(image)
        around = pixels[~mask] if (~mask).any() else pixels.reshape(-1, 3)
        used = alt if self.bank.folder(alt) is not None else self.bank.unlike(around, row["image_id"])
        backdrop_path = self.bank.pick(used, row["image_id"]) if used else None
        if backdrop_path is None:
            return f"no bank images for {alt!r} nor for any background unlike the image's"
        backdrop = load_rgb(backdrop_path).resize(image.size, Image.BILINEAR)
        edited = Image.fromarray(np.where(mask[..., None], pixels, np.asarray(backdrop)))
        edited.info["alt_used"] = used  # the bank may lack the proposed alternative: say which one was pasted
        return edited

    def edit(self, images: list[Image.Image], backgrounds: list[str], alts: list[str], rows: list[Row]) -> list[Image.Image | str]:
        return [self.edit_one(*args) for args in zip(images, backgrounds, alts, rows)]


def load_editor(config: BackgroundConfig, remove: RemoveConfig) -> BackgroundEditor:
    """The configured background editor (built once per worker by the backends' own loaders)."""
    if config.backend == "composite":
        from tasks.grounders import load_grounder
        from tasks.segmenters import load_segmenter

        return CompositeEditor(config, load_grounder(remove), load_segmenter(remove))
    from tasks.instruct_pix2pix import load_editor as load_pix2pix

    return load_pix2pix(config)


def editor_identity(config: BackgroundConfig, remove: RemoveConfig) -> str:
    """What the edits depend on, without loading a model."""
    if config.backend == "composite":
        from tasks.grounders import grounder_identity
        from tasks.segmenters import segmenter_identity

        return f"composite:{BackgroundBank(config.bank).identity}:{grounder_identity(remove)}:{segmenter_identity(remove)}"
    from tasks.instruct_pix2pix import editor_identity as pix2pix_identity

    return pix2pix_identity(config)


def edit_batch(rows: list[Row], config: BackgroundConfig, editor: BackgroundEditor) -> list[tuple[Row, Image.Image | None]]:
    """One attempt per image: (record, edited image or None with the reason in ``skip_reason``)."""
    results: list[tuple[Row, Image.Image | None]] = []
    todo: list[tuple[Row, Image.Image, Row]] = []  # (record, image, source row)
    for row in rows:
        record = attempt_row(row, 0, row.get("background") or None, "background", EDIT_SOURCE, alt=row.get("alt") or None)
        if row.get("extract_error"):
            results.append(({**record, "skip_reason": f"no extraction: {row['extract_error']}"}, None))
        elif not row.get("background") or not row.get("alt"):
            results.append(({**record, "skip_reason": "no background" if not row.get("background") else "no alternative"}, None))
        else:
            try:
                todo.append((record, load_for_editing(row["path"], 1024), row))
            except ImageError as exc:
                results.append(({**record, "skip_reason": f"image: {exc.reason}"}, None))
    if todo:
        records, images, sources = zip(*todo)
        try:
            edited = editor.edit(list(images), [r["phrase"] for r in records], [r["alt"] for r in records], list(sources))
        except Exception as exc:  # the backend failed on this batch: record it, go on with the next
            log.warning("background: editing failed for a batch of %d: %s", len(todo), exc)
            edited = [f"{type(exc).__name__}: {exc}"] * len(todo)
        for record, image in zip(records, edited):
            if isinstance(image, str):
                results.append(({**record, "skip_reason": image}, None))
            else:
                results.append(({**record, "alt_used": image.info.get("alt_used", record["alt"])}, image))
    return results


def run_background(rows: list[Row], config: BackgroundConfig, editor: BackgroundEditor, classifier,
                   out_dir: Path, save_all: bool = False) -> ShardResult:
    """Attempt a background change for every held-out image of a shard; keep the edits that flip the prediction."""
    originals = [r for r in rows if not is_edit(r)]
    attempts: list[Row] = []
    for i in tqdm(range(0, len(originals), config.batch_size), desc="background", unit="batch", leave=False, disable=None):
        results = edit_batch(originals[i : i + config.batch_size], config, editor)
        attempts += classify_and_keep(results, classifier, out_dir, save_all)
    return ShardResult(rows + attempts, [], attempt_stats(attempts))


@task(name="background-shard", task_run_name="background-shard-{index}", tags=["gpu"], cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def background_shard_task(store: StageStore, index: int, rows: list[Row], config: BackgroundConfig, remove: RemoveConfig,
                          model_path: Path, model_digest: str) -> dict:
    """Change backgrounds in one shard and commit it (skipped when already committed)."""
    from tasks.classifier import load_classifier

    editor = load_editor(config, remove)
    classifier = load_classifier(model_path, model_digest)
    return store.ensure_shard(index, rows, lambda shard_rows, out: run_background(
        shard_rows, config, editor, classifier, out, remove.save_all), salt=model_digest)
