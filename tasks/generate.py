"""Stage ``generate`` (ASPIRE step 5): n x new training images per class without its spurious features.

ASPIRE Sec. 2(5) and App. A.4 (https://arxiv.org/abs/2308.10103). Backends:

- ``textual-inversion`` (:mod:`tasks.generate_sd`): Stable Diffusion with the class's learned token from the
  ``personalize`` stage, prompt "a photo of a {token}", one seed per image, safety checker and an optional
  CLIP filter that drops generations still showing a top-k spurious phrase.
- ``composite`` (this module, CPU): imitates what textual inversion learns from the kept edits of the top-k
  groups: the class's core object and the exemplars' other foreground, without the top-k phrases, at a random place
  and scale on the exemplar's scene, or on a bank background for a changed-background exemplar
  (:class:`CompositeGenerator`).

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
from aspire.config import GenerateConfig, RemoveConfig
from aspire.images import load_rgb
from aspire.manifest import Row, digest
from aspire.phrases import BowEmbedder, normalize_phrase
from aspire.readers import IMAGE_EXTENSIONS
from tasks.remove import is_edit, load_for_editing
from tasks.vision import Grounder, Inpainter, Segmenter, dilate
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "generate"
VERSION = 6


MINORITY_FRACTION = 0.5
"""A group is a minority group when it has fewer than this fraction of its class's largest group's images."""


def images_per_class(all_rows: list[Row], config: GenerateConfig, per_class: float | None = None) -> dict[str, int]:
    """How many images to generate per class (ASPIRE App. A.4, Table 3).

    ``per_class`` set (the argument, else the config's; the largest of a list): that multiple of the class's
    training images. Default: 1x the class's training images when the dataset has no group labels (Hard
    ImageNet); else 1x the class's minority-group images (:func:`minority_images`)."""
    if per_class is None:
        per_class = max(config.per_class) if isinstance(config.per_class, list) else config.per_class
    counts: dict[str, dict] = {}
    for row in all_rows:
        if row["split"] == "train" and not is_edit(row) and row.get("source") != "generated":
            groups = counts.setdefault(row["class_name"], {})
            groups[row.get("group")] = groups.get(row.get("group"), 0) + 1
    result = {}
    for name, groups in counts.items():
        total = sum(groups.values())
        if per_class is not None:
            result[name] = round(per_class * total)
        elif None in groups:
            result[name] = total
        else:
            result[name] = minority_images(groups)
    return result


def minority_images(group_sizes: dict[int, int]) -> int:
    """The training images of a class's minority groups: groups with fewer than :data:`MINORITY_FRACTION` of the
    class's largest group. With the papers' training counts this gives ASPIRE's Table 3: Waterbirds 184 + 56 = 240
    (landbirds on water, waterbirds on land), CelebA 1,387 (blond males only: non-blond males, 66,874 against
    71,629 non-blond females, are no minority), SpuCo Dogs 500 + 500. A class whose groups are about equal has none."""
    largest = max(group_sizes.values())
    return sum(n for n in group_sizes.values() if n < MINORITY_FRACTION * largest)


def plan_jobs(counts: dict[str, int], labels: dict[str, int], seed: int) -> list[Row]:
    """One job row per image to generate, each with its own seed (job ``i`` of a class is the same image whatever
    the count, so a smaller multiple's images are the first of a larger one's)."""
    return [{"image_id": f"gen::{name}::{i}", "class_name": name, "label": labels[name], "split": "train",
             "seed": int(digest([seed, name, i]), 16) % (2**31)} for name in sorted(counts) for i in range(counts[name])]


def mark_choices(jobs: list[Row], choices: dict[float, dict[str, int]]) -> list[Row]:
    """Each job with ``per_class_from``: the smallest multiple whose count (``choices[multiple][class]``) includes
    it; the retrain stage trains each multiple on the images with ``per_class_from <= multiple``."""
    marked = []
    for job in jobs:
        index = int(job["image_id"].rsplit("::", 1)[1])
        first = min(m for m, counts in choices.items() if index < counts[job["class_name"]])
        marked.append({**job, "per_class_from": first})
    return marked


def with_multiple(rows: list[Row], multiple: float) -> list[Row]:
    """The rows without the generated images beyond ``multiple`` (:func:`mark_choices`); a row without a mark
    (None, or NaN from a table reader) is kept."""
    def beyond(row: Row) -> bool:
        mark = row.get("per_class_from")
        return row.get("source") == "generated" and mark is not None and mark == mark and mark > multiple

    return [r for r in rows if not beyond(r)]


def generator_exemplars(rows: list[Row], learn_from: str, min_images: int = 3, limit: int | None = 64
                        ) -> dict[str, list[Row]]:
    """Per class, the images the composite generator imitates, as textual inversion would learn from them.

    ``kept-edits`` (ASPIRE): the edits that textual inversion trains on (:func:`tasks.collapse.training_edits`:
    the kept edits of the class's top-k groups, else all its kept edits, at least ``min_images``), each
    as its source row with the edited ``path`` (its boxes still locate the objects an edit did not remove) and
    ``learn_group``, the exemplar group drawn uniformly (the top-k group, else the edited phrase).
    ``held-out`` (a control without discovery): the class's held-out originals. At most ``limit`` per class,
    chosen by a digest of the image id so the choice does not depend on row order."""
    from tasks.collapse import training_edits

    originals = {r["image_id"]: r for r in rows if not is_edit(r) and r.get("source") != "generated"}
    out: dict[str, list[Row]] = {}
    if learn_from == "held-out":
        for row in originals.values():
            out.setdefault(row["class_name"], []).append({**row, "learn_group": "held-out"})
    else:
        for name in sorted({r["class_name"] for r in rows if is_edit(r)}):
            for edit in training_edits(rows, name, min_images)[0]:
                source = originals.get(edit.get("source_image_id"))
                group = edit.get("top_k_group")
                if source is not None:
                    out.setdefault(name, []).append(
                        {**source, "image_id": edit["image_id"], "path": edit["path"],
                         "learn_group": f"top-k {group}" if group is not None else f"phrase {edit.get('phrase')}",
                         "edit": edit["source"]})
    return {name: sorted(found, key=lambda r: digest(r["image_id"]))[:limit] for name, found in sorted(out.items())}


def edits_as_augmentations(rows: list[Row], min_images: int = 3) -> list[Row]:
    """Every kept edit a class's generator would learn from (:func:`generator_exemplars`) as a training row of its
    class (``source="generated"``, ``generator="edits"``): the augmentation of ASPIRE Table 2's ablation "training
    on the edits" instead of on images generated from them. The edited file is used as it is."""
    found = generator_exemplars(rows, "kept-edits", min_images, limit=None)
    dropped = ("spurious_group", "top_k_group", "learn_group", "edit", "holdout", "pred", "pred_conf", "correct")
    return [{**{k: v for k, v in e.items() if k not in dropped},
             "image_id": f"gen::{e['class_name']}::{e['image_id']}", "source": "generated", "generator": "edits",
             "seed": -1, "group": None, "spurious_avoided": []} for name in found for e in found[name]]


def _layer(image: Image.Image, mask: np.ndarray) -> Image.Image | None:
    """The masked pixels of ``image`` cropped to their box, as RGBA (alpha 0 or 255); None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return Image.fromarray(np.dstack([np.asarray(image)[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255]), "RGBA")


def similar_to_any(phrase: str, others: list[str]) -> bool:
    """Whether ``phrase`` names one of ``others`` (bag-of-stems cosine >= 0.5: "red ball" names "ball")."""
    if not others:
        return False
    vectors = BowEmbedder().embed([phrase, *others])
    return bool((vectors[1:] @ vectors[0]).max() >= 0.5 - 1e-6)


class CompositeGenerator:
    """The CPU stand-in of textual inversion + Stable Diffusion: new images that imitate a class's exemplars.

    Textual inversion learns the class's concept from its training images (ASPIRE: the kept edits, whose
    spurious feature was removed or whose background was changed), and "a photo of <token>" draws what those
    images share: a token learned from images that all show the class on snow beside a sled draws snow and sleds.
    The variety of the generated contexts therefore comes from the edits, that is from what was discovered, not
    from the generator. Here each exemplar is split, by the remove stage's grounder, segmenter and inpainter, into

    - a *foreground layer*: the core object and the exemplar's other foreground phrases minus the class's spurious
      ones (what was not found spurious comes along; ``generate.carry_objects`` below 1 drops it at random, an
      ablation);
    - a *scene*: the exemplar with that foreground and the spurious phrases inpainted away.

    A generated image is one exemplar's foreground layer (drawn group-uniformly: each discovered feature equally
    often), mirrored or not, rescaled, at a random place, on its own scene. An exemplar of a background group
    (a changed background) teaches that the background varies, so its scene is a uniformly drawn bank background
    whenever a bank is configured: the background an edit happened to flip on (often one the classifier ties to
    another class) is not copied into the class's images, which would make that background a new shortcut against
    the other class; the bank is the same for every class. So does an exemplar whose own background names one of
    the class's spurious phrases (``generate.avoid_backgrounds``: an object-removal edit still shows the spurious
    background, which is not pasted either). ``generate.context_prior`` above 0 draws a bank scene
    for any exemplar with that probability (an ablation: contexts then vary whatever was discovered). Nothing is
    forbidden (the class's usual background is one of the scenes) and a spurious object is never pasted."""

    def __init__(self, config: GenerateConfig, grounder: Grounder, segmenter: Segmenter, inpainter: Inpainter,
                 dilate_px: int, bank: Path | None) -> None:
        self.config, self.grounder, self.segmenter, self.inpainter = config, grounder, segmenter, inpainter
        self.dilate_px = dilate_px
        self.bank = sorted(f for f in Path(bank).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS) if bank else []
        if config.context_prior > 0 and not self.bank:
            raise ValueError(f"generate.context_prior={config.context_prior} needs background.bank (a folder of "
                             f"background images), got {str(bank)!r}")

    def learn(self, exemplars: list[Row], class_name: str, spurious: list[list[str]]) -> list[dict]:
        """Per usable exemplar: ``scene`` (RGB), ``layer`` (RGBA crop of the kept foreground) and ``group`` (its
        ``learn_group``: generation draws the groups uniformly)."""
        core = class_name.replace("_", " ")
        avoid = sorted({normalize_phrase(p) for group in spurious for p in group})
        learned = []
        for row in exemplars:
            image = load_for_editing(row["path"], 1024)
            keep = [core, *(p for p in row.get("foreground") or [] if not similar_to_any(p, avoid))]
            phrases = list(dict.fromkeys([*keep, *avoid]))
            detections = self.grounder.ground(image, phrases, row)
            if not any(d.phrase == core for d in detections):
                continue
            masks = self.segmenter.segment(image, [d.box for d in detections])
            core_mask = np.zeros((image.height, image.width), dtype=bool)
            layer_mask, hole = core_mask.copy(), core_mask.copy()
            for detection, mask in zip(detections, masks):
                hole |= mask
                core_mask |= mask if detection.phrase == core else False
                layer_mask |= mask if detection.phrase in keep else False
            (scene,) = self.inpainter.inpaint([image], [dilate(hole, self.dilate_px)])
            layers = [_layer(image, core_mask), _layer(image, layer_mask)]
            if layers[0] is None:
                continue
            spurious_scene = self.config.avoid_backgrounds and similar_to_any(row.get("background") or "", avoid)
            learned.append({"scene": scene, "core": layers[0], "layer": layers[1],
                            "group": row["learn_group"],
                            "scene_varies": row.get("edit") == "edit-background" or spurious_scene})
        return learned

    def generate(self, job: Row, learned: list[dict], size: int) -> Image.Image | str:
        if not learned:
            return f"no exemplar of {job['class_name']!r} with a core object to learn from"
        rng = np.random.default_rng(job["seed"])
        groups = sorted({item["group"] for item in learned})
        group = groups[int(rng.integers(len(groups)))]
        pool = [item for item in learned if item["group"] == group]
        exemplar = pool[int(rng.integers(len(pool)))]
        from_prior = rng.random() < self.config.context_prior or exemplar["scene_varies"]
        if from_prior and self.bank:
            scene = load_rgb(self.bank[int(rng.integers(len(self.bank)))])
        else:
            scene = exemplar["scene"].convert("RGB")
        scene = scene.resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            scene = scene.transpose(Image.FLIP_LEFT_RIGHT)
        layer = exemplar["layer"] if rng.random() < self.config.carry_objects else exemplar["core"]
        if rng.random() < 0.5:
            layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
        scale = rng.uniform(*self.config.object_scale) * size / max(exemplar["scene"].size)
        w = max(2, min(size, round(layer.width * scale)))
        h = max(2, min(size, round(layer.height * scale)))
        rgba = np.asarray(layer.resize((w, h), Image.NEAREST))  # (h, w, 4), alpha 0 or 255
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        return Image.fromarray(paste(np.asarray(scene), rgba, x, y))


def run_generate_composite(jobs: list[Row], generator: CompositeGenerator, exemplars: dict[str, list[Row]],
                           spurious: dict[str, list[list[str]]], out_dir: Path) -> ShardResult:
    """Generate a shard of jobs with the composite generator; jobs that cannot be made are quarantined."""
    rows, quarantine = [], []
    cache: dict[str, tuple] = {}
    avoided = spurious if generator.config.learn_from == "kept-edits" else {}
    for job in jobs:
        name = job["class_name"]
        if name not in cache:
            learned = generator.learn(exemplars.get(name, []), name, avoided.get(name, []))
            size = generator.config.image_size or (learned[0]["scene"].width if learned else 64)  # default: the sources' size
            cache[name] = (learned, size)
        learned, size = cache[name]
        image = generator.generate(job, learned, size)
        if isinstance(image, str):
            quarantine.append({"image_id": job["image_id"], "path": None, "reason": image})
            continue
        path = out_dir / f"{job['image_id'].replace('::', '__')}.png"
        image.save(path)
        rows.append({**job, "path": str(path), "source": "generated", "generator": "composite", "group": None,
                     "spurious_avoided": avoided.get(name, [])})
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


@task(name="generate-shard", task_run_name="generate-shard-{index}", tags=["gpu"], cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def generate_shard_task(store: StageStore, index: int, rows: list[Row], config: GenerateConfig, remove: RemoveConfig,
                        model: str, tokens: dict, spurious: dict, exemplars: dict, bank: Path | None) -> dict:
    """Generate one shard of jobs and commit it (skipped when already committed)."""
    if config.backend == "composite":
        from tasks.grounders import load_grounder
        from tasks.inpainters import load_inpainter
        from tasks.segmenters import load_segmenter

        generator = CompositeGenerator(config, load_grounder(remove), load_segmenter(remove), load_inpainter(remove),
                                       remove.dilate, bank)
        return store.ensure_shard(index, rows, lambda jobs, out: run_generate_composite(jobs, generator, exemplars,
                                                                                        spurious, out))
    return store.ensure_shard(index, rows, lambda jobs, out: run_generate_sd(jobs, config, model, tokens, spurious, out))
