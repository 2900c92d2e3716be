"""Stage ``generate`` (ASPIRE step 5): n x new training images per class without its spurious features.

ASPIRE Sec. 2(5) and App. A.4 (https://arxiv.org/abs/2308.10103). Backends:

- ``textual-inversion`` (:mod:`tasks.generate_sd`): Stable Diffusion with the class's learned token from the
  ``personalize`` stage, prompt "a photo of a {token}", one seed per image, safety checker and an optional
  CLIP filter that drops generations still showing a top-k spurious phrase.
- ``composite`` (this module, CPU): the class's core object, cut out of its held-out images (grounded by the
  class name and segmented, as in the remove stage), rescaled and placed at a random position on a bank
  background that is none of the class's spurious groups.

Work is planned as one job row per image to generate (``gen::<class>::<i>`` with its seed), sharded like any
stage. Generated rows: ``source="generated"``, ``generator``, ``seed``, ``spurious_avoided``, ``split="train"``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import ShardResult, StageStore
from aspire.compose import paste
from aspire.config import BackgroundConfig, GenerateConfig, RemoveConfig
from aspire.manifest import Row, digest
from aspire.phrases import BowEmbedder
from tasks.background import BackgroundBank
from tasks.remove import is_edit, load_for_editing
from tasks.vision import Grounder, Segmenter

log = logging.getLogger(__name__)

STAGE = "generate"
VERSION = 1


def images_per_class(all_rows: list[Row], config: GenerateConfig) -> dict[str, int]:
    """How many images to generate per class (App. A.4).

    ``per_class`` set: that multiple of the class's training images. Default: 1x the class's training images
    when the dataset has no group labels; else 1x the class's minority images (its training images outside
    its largest group)."""
    counts: dict[str, dict] = {}
    for row in all_rows:
        if row["split"] == "train" and not is_edit(row) and row.get("source") != "generated":
            groups = counts.setdefault(row["class_name"], {})
            groups[row.get("group")] = groups.get(row.get("group"), 0) + 1
    result = {}
    for name, groups in counts.items():
        total = sum(groups.values())
        if config.per_class is not None:
            result[name] = round(config.per_class * total)
        elif None in groups:
            result[name] = total
        else:
            result[name] = total - max(groups.values())
    return result


def plan_jobs(counts: dict[str, int], labels: dict[str, int], seed: int) -> list[Row]:
    """One job row per image to generate, each with its own seed."""
    return [{"image_id": f"gen::{name}::{i}", "class_name": name, "label": labels[name], "split": "train",
             "seed": int(digest([seed, name, i]), 16) % (2**31)} for name in sorted(counts) for i in range(counts[name])]


def _allowed(bank: BackgroundBank, spurious: list[list[str]]) -> list[Path]:
    """Bank folders that name none of the spurious phrases (bag-of-stems similarity < 0.5 to every one)."""
    phrases = [p for group in spurious for p in group]
    names = list(bank.folders)
    if not phrases:
        return [bank.folders[n] for n in names]
    vectors = BowEmbedder().embed(names + phrases)
    sims = vectors[: len(names)] @ vectors[len(names):].T
    return [bank.folders[n] for n, row in zip(names, sims) if row.max() < 0.5 - 1e-6]


class CompositeGenerator:
    """Core objects of a class pasted on backgrounds outside its spurious groups (the CPU generator)."""

    def __init__(self, config: GenerateConfig, bank_dir: Path, grounder: Grounder, segmenter: Segmenter) -> None:
        self.config, self.bank = config, BackgroundBank(bank_dir)
        self.grounder, self.segmenter = grounder, segmenter
        self.identity = f"composite:{self.bank.identity}:{grounder.identity}:{segmenter.identity}"

    def cutouts(self, sources: list[Row], class_name: str, limit: int = 64) -> list[tuple[Image.Image, np.ndarray]]:
        """Up to ``limit`` (RGBA crop of the core object, boolean mask) from the class's held-out images."""
        out = []
        phrase = class_name.replace("_", " ")
        for row in sources[:limit]:
            image = load_for_editing(row["path"], 1024)
            detections = self.grounder.ground(image, [phrase], row)
            if not detections:
                continue
            best = max(detections, key=lambda d: d.score)
            (mask,) = self.segmenter.segment(image, [best.box])
            x0, y0, x1, y1 = (int(round(v)) for v in best.box)
            crop, crop_mask = image.crop((x0, y0, x1, y1)), mask[y0:y1, x0:x1]
            if crop_mask.any():
                out.append((crop, crop_mask))
        return out

    def generate(self, job: Row, cutouts, backgrounds: list[Path], size: int) -> Image.Image | str:
        if not cutouts:
            return f"no core object of {job['class_name']!r} found in its held-out images"
        if not backgrounds:
            return "every bank background is among the class's spurious groups"
        rng = np.random.default_rng(job["seed"])
        crop, mask = cutouts[int(rng.integers(len(cutouts)))]
        folder = backgrounds[int(rng.integers(len(backgrounds)))]
        files = sorted(p for p in folder.iterdir() if p.is_file())
        canvas = load_for_editing(str(files[int(rng.integers(len(files)))]), 4096).resize((size, size), Image.BILINEAR)
        scale = rng.uniform(*self.config.object_scale)
        w = max(2, min(size, round(crop.width * scale)))
        h = max(2, min(size, round(crop.height * scale)))
        obj = np.asarray(crop.convert("RGB").resize((w, h), Image.BILINEAR))  # (h, w, 3)
        alpha = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((w, h), Image.NEAREST))  # (h, w)
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        return Image.fromarray(paste(np.asarray(canvas.convert("RGB")), np.dstack([obj, alpha]), x, y))


def run_generate_composite(jobs: list[Row], generator: CompositeGenerator, sources: dict[str, list[Row]],
                           spurious: dict[str, list[list[str]]], out_dir: Path) -> ShardResult:
    """Generate a shard of jobs with the composite generator; jobs that cannot be made are quarantined."""
    rows, quarantine = [], []
    cache: dict[str, tuple] = {}
    for job in jobs:
        name = job["class_name"]
        if name not in cache:
            cut = generator.cutouts(sources.get(name, []), name)
            size = generator.config.image_size or (load_for_editing(sources[name][0]["path"], 1024).width
                                                   if sources.get(name) else 64)  # default: the sources' size
            cache[name] = (cut, _allowed(generator.bank, spurious.get(name, [])), size)
        cut, backgrounds, size = cache[name]
        image = generator.generate(job, cut, backgrounds, size)
        if isinstance(image, str):
            quarantine.append({"image_id": job["image_id"], "path": None, "reason": image})
            continue
        path = out_dir / f"{job['image_id'].replace('::', '__')}.png"
        image.save(path)
        rows.append({**job, "path": str(path), "source": "generated", "generator": "composite", "group": None,
                     "spurious_avoided": spurious.get(name, [])})
    return ShardResult(rows, quarantine, {"generated": len(rows), "failed": len(quarantine)})


def run_generate_sd(jobs: list[Row], config: GenerateConfig, model: str, tokens: dict[str, tuple[str, str]],
                    spurious: dict[str, list[list[str]]], out_dir: Path) -> ShardResult:
    """Generate a shard of jobs with Stable Diffusion and the learned tokens (``tokens``: class -> (embeds, token))."""
    from tasks.generate_sd import load_clip_filter, load_generator

    generator = load_generator(config, model)
    clip = load_clip_filter(config) if config.clip_filter else None
    rows, quarantine, stats = [], [], {"generated": 0, "safety_filtered": 0, "clip_filtered": 0, "failed": 0}
    for name in sorted({j["class_name"] for j in jobs}):
        mine = [j for j in jobs if j["class_name"] == name]
        if name not in tokens:
            quarantine += [{"image_id": j["image_id"], "path": None, "reason": f"no learned token for {name!r}"} for j in mine]
            stats["failed"] += len(mine)
            continue
        embeds, token = tokens[name]
        generator.load_token(Path(embeds), token)
        results = dict(generator.generate(name, token, [j["seed"] for j in mine]))
        images = {j["image_id"]: results[j["seed"]] for j in mine}
        made = [(j, images[j["image_id"]]) for j in mine if not isinstance(images[j["image_id"]], str)]
        keep = clip.keep([im for _, im in made], [p for g in spurious.get(name, []) for p in g]) if clip else [True] * len(made)
        for j in mine:
            if isinstance(images[j["image_id"]], str):
                stats["safety_filtered"] += 1
                quarantine.append({"image_id": j["image_id"], "path": None, "reason": images[j["image_id"]]})
        for (job, image), ok in zip(made, keep):
            if not ok:
                stats["clip_filtered"] += 1
                quarantine.append({"image_id": job["image_id"], "path": None, "reason": "still shows a spurious phrase (CLIP)"})
                continue
            path = out_dir / f"{job['image_id'].replace('::', '__')}.png"
            image.save(path)
            rows.append({**job, "path": str(path), "source": "generated", "generator": "textual-inversion",
                         "token": token, "group": None, "spurious_avoided": spurious.get(name, [])})
            stats["generated"] += 1
    return ShardResult(rows, quarantine, stats)


def core_sources(rows: list[Row]) -> dict[str, list[Row]]:
    """Held-out original images per class (where core objects are cut out from)."""
    out: dict[str, list[Row]] = {}
    for row in rows:
        if not is_edit(row) and row.get("source") != "generated":
            out.setdefault(row["class_name"], []).append(row)
    return out


@task(name="generate-shard", task_run_name="generate-shard-{index}", tags=["gpu"], cache_policy=NO_CACHE, retries=1)
def generate_shard_task(store: StageStore, index: int, rows: list[Row], config: GenerateConfig, remove: RemoveConfig,
                        background: BackgroundConfig, model: str, tokens: dict, spurious: dict, sources: dict) -> dict:
    """Generate one shard of jobs and commit it (skipped when already committed)."""
    if config.backend == "composite":
        from tasks.grounders import load_grounder
        from tasks.segmenters import load_segmenter

        generator = CompositeGenerator(config, background.bank, load_grounder(remove), load_segmenter(remove))
        return store.ensure_shard(index, rows, lambda jobs, out: run_generate_composite(jobs, generator, sources,
                                                                                        spurious, out))
    return store.ensure_shard(index, rows, lambda jobs, out: run_generate_sd(jobs, config, model, tokens, spurious, out))
