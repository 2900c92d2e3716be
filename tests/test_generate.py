"""The composite generator: what it learns from (kept edits or, as a control, held-out originals) and how it
samples contexts (every exemplar group, the class's usual background included, spurious objects never pasted)."""

from pathlib import Path

import numpy as np
from PIL import Image

from aspire.config import GenerateConfig, RemoveConfig
from tasks.generate import CompositeGenerator, generator_exemplars, plan_jobs, run_generate_composite
from tasks.grounders import AnnotationsGrounder
from tasks.inpainters import OpenCVInpainter
from tasks.segmenters import BoxSegmenter

REMOVE = RemoveConfig(ground="annotations", segment="box", inpaint="opencv", dilate=3)
BLUE, GREEN, RED, CORE = (30, 60, 200), (40, 170, 40), (230, 20, 20), (90, 90, 90)
SAND, SNOW = (220, 190, 120), (245, 245, 250)
BOXES = [{"phrase": "a", "box": [8, 8, 24, 24]}, {"phrase": "ball", "box": [40, 40, 56, 56]}]


def image(path: Path, background, ball: bool) -> str:
    picture = Image.new("RGB", (64, 64), background)
    picture.paste(CORE, (8, 8, 24, 24))
    if ball:
        picture.paste(RED, (40, 40, 56, 56))
    picture.save(path)
    return str(path)


def manifest(tmp_path: Path) -> list[dict]:
    """One held-out original (class 'a' on blue beside a red ball) and its two edits: the ball removed (kept,
    group 0), the background turned green (kept, group 1, the ball still there), and an edit that did not flip."""
    original = {"image_id": "o", "path": image(tmp_path / "o.png", BLUE, True), "label": 0, "class_name": "a",
                "split": "train", "source": "original", "boxes": BOXES, "holdout": True, "foreground": ["red ball"],
                "background": "blue lake"}

    def edit(kind, background, ball, group, kept=True):
        return {"image_id": f"o::{kind}::0", "source_image_id": "o", "path": image(tmp_path / f"{kind}.png", background, ball),
                "label": 0, "class_name": "a", "split": "train", "source": f"edit-{kind}", "kept": kept,
                "spurious_group": group, "top_k_group": group, "phrase": kind}

    return [original, edit("remove", BLUE, False, 0), edit("background", GREEN, True, 1),
            edit("unflipped", GREEN, False, None, kept=False)]


def bank(tmp_path: Path) -> Path:
    root = tmp_path / "bank"
    for name, colour in (("sand", SAND), ("snow", SNOW)):
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(root / name / "0.png")
    return root


def generate(tmp_path: Path, learn_from: str, n: int = 40, prior: float = 0.0, carry: float = 1.0,
             spurious=(("ball",), ("green",)), avoid_backgrounds: bool = True) -> list[np.ndarray]:
    rows = manifest(tmp_path)
    config = GenerateConfig(backend="composite", learn_from=learn_from, object_scale=(1.0, 1.0), context_prior=prior,
                            carry_objects=carry, avoid_backgrounds=avoid_backgrounds)
    generator = CompositeGenerator(config, AnnotationsGrounder(), BoxSegmenter(), OpenCVInpainter(REMOVE), 3,
                                   bank(tmp_path))
    jobs = plan_jobs({"a": n}, {"a": 0}, seed=0)
    out = tmp_path / f"{learn_from}-{prior}-{carry}-{len(spurious)}-{avoid_backgrounds}"
    out.mkdir()
    result = run_generate_composite(jobs, generator, generator_exemplars(rows, learn_from, min_images=1),
                                    {"a": [list(group) for group in spurious]}, out)
    assert len(result.rows) == n and not result.quarantine
    return [np.asarray(Image.open(r["path"])).astype(int) for r in result.rows]


def fraction(pixels: np.ndarray, colour) -> float:
    return float((np.abs(pixels - np.array(colour)).sum(-1) < 40).mean())


def test_exemplars_are_the_kept_edits_of_spurious_groups_with_their_source_boxes(tmp_path):
    rows = manifest(tmp_path)
    kept = generator_exemplars(rows, "kept-edits", min_images=1)["a"]
    assert sorted(r["image_id"] for r in kept) == ["o::background::0", "o::remove::0"]
    assert all(r["boxes"] == BOXES and r["path"] != rows[0]["path"] for r in kept)
    assert {r["learn_group"] for r in kept} == {"top-k 0", "top-k 1"}
    held_out = generator_exemplars(rows, "held-out")["a"]
    assert [r["image_id"] for r in held_out] == ["o"]


def test_scenes_come_from_every_group_and_the_spurious_object_is_never_pasted(tmp_path):
    images = generate(tmp_path, "kept-edits")
    on_blue = [fraction(im, BLUE) > 0.5 for im in images]
    on_bank = [fraction(im, SAND) > 0.5 or fraction(im, SNOW) > 0.5 for im in images]
    assert all(b != k for b, k in zip(on_blue, on_bank))
    # group-uniform: the removal edit's scene (the class's usual blue, not forbidden) half the time; the
    # background edit teaches that the background varies, so its scene comes from the bank, never its green
    assert 10 <= sum(on_blue) <= 30 and max(fraction(im, GREEN) for im in images) == 0.0
    assert max(fraction(im, RED) for im in images) == 0.0  # the ball (spurious) is never pasted
    assert min(fraction(im, CORE) for im in images) > 0.03  # every image shows the core object
    assert len({im.tobytes() for im in images}) > 30  # positions and mirroring vary


def test_an_exemplar_on_a_spurious_background_takes_a_bank_scene_unless_the_ablation_keeps_it(tmp_path):
    # the removal edit still shows the original's "blue lake"; once blue is a spurious feature of the class, that
    # scene is not copied (as the ball is not pasted): every image is on a bank scene, sand and snow alike
    images = generate(tmp_path, "kept-edits", spurious=(("ball",), ("blue water",)))
    assert max(fraction(im, BLUE) for im in images) == 0.0
    on_sand = sum(fraction(im, SAND) > 0.5 for im in images)
    assert 10 <= on_sand <= 30 and on_sand + sum(fraction(im, SNOW) > 0.5 for im in images) == len(images)
    assert max(fraction(im, RED) for im in images) == 0.0 and min(fraction(im, CORE) for im in images) > 0.03
    kept = generate(tmp_path, "kept-edits", spurious=(("ball",), ("blue water",)), avoid_backgrounds=False)
    assert 10 <= sum(fraction(im, BLUE) > 0.5 for im in kept) <= 30  # the ablation: as the exemplar shows it


def test_without_discovery_the_generator_avoids_nothing(tmp_path):
    images = generate(tmp_path, "held-out", n=10)
    assert all(fraction(im, BLUE) > 0.5 for im in images)  # the only exemplar is the original on blue
    assert min(fraction(im, RED) for im in images) > 0.02  # and its ball comes along in the foreground


def test_the_scene_prior_is_the_bank_for_every_class_and_keeps_the_learned_foreground(tmp_path):
    images = generate(tmp_path, "held-out", n=40, prior=0.5)
    on_bank = [fraction(im, SAND) > 0.5 or fraction(im, SNOW) > 0.5 for im in images]
    assert 10 <= sum(on_bank) <= 30 and any(fraction(im, SAND) > 0.5 for im in images)
    assert min(fraction(im, RED) for im in images) > 0.02  # the ball is part of the learned foreground
    assert min(fraction(im, CORE) for im in images) > 0.03


def test_other_objects_come_along_with_the_carry_probability(tmp_path):
    images = generate(tmp_path, "held-out", n=40, carry=0.5)
    with_ball = sum(fraction(im, RED) > 0.02 for im in images)
    assert 10 <= with_ball <= 30 and max(fraction(im, RED) for im in images if fraction(im, RED) <= 0.02) == 0.0
    assert min(fraction(im, CORE) for im in images) > 0.03


def test_a_prior_without_a_bank_is_an_error_naming_the_keys(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="generate.context_prior=0.5 needs background.bank"):
        CompositeGenerator(GenerateConfig(backend="composite", context_prior=0.5), AnnotationsGrounder(), BoxSegmenter(),
                           OpenCVInpainter(REMOVE), 3, None)


def test_the_edits_ablation_adds_the_kept_spurious_edits_themselves():
    """ASPIRE Table 2, "training on the edits": each kept edit of a top-k spurious group becomes a training row of
    its class with the edited file; edits that did not flip or are outside the top-k groups do not."""
    from tasks.generate import edits_as_augmentations

    original = {"image_id": "o1", "path": "/o1.png", "label": 1, "class_name": "cat", "split": "train", "group": 3,
                "holdout": True, "pred": 1}
    edits = [{"image_id": "o1::rm::ball", "source_image_id": "o1", "path": "/e1.png", "class_name": "cat", "label": 1,
              "split": "train", "source": "edit-remove", "kept": kept, "top_k_group": group}
             for kept, group in ((True, 0), (False, 0), (True, None))]
    edits[1]["image_id"], edits[2]["image_id"] = "o1::rm::x", "o1::rm::y"
    edits[1]["path"], edits[2]["path"] = "/e2.png", "/e3.png"
    made = edits_as_augmentations([original, *edits], min_images=1)
    assert [(r["image_id"], r["path"], r["source"], r["generator"], r["label"]) for r in made] == [
        ("gen::cat::o1::rm::ball", "/e1.png", "generated", "edits", 1)]
    assert "pred" not in made[0] and made[0]["group"] is None
    # fewer top-k edits than min_images: all kept edits, as textual inversion would train on
    assert [r["path"] for r in edits_as_augmentations([original, *edits], min_images=2)] == ["/e1.png", "/e3.png"]


def test_a_class_without_top_k_edits_learns_from_all_its_kept_edits_as_textual_inversion_would(tmp_path):
    """Fewer top-k edits than min_images: the composite generator takes the images personalize trains on, all of
    the class's kept edits, drawn uniformly over the edited phrases; with fewer kept edits the class gets none."""
    from tasks.personalize import select_training_images

    rows = [{**r, "top_k_group": None} if r.get("source", "").startswith("edit-") else r for r in manifest(tmp_path)]
    exemplars = generator_exemplars(rows, "kept-edits", min_images=2)["a"]
    assert sorted(r["image_id"] for r in exemplars) == ["o::background::0", "o::remove::0"]
    assert {r["learn_group"] for r in exemplars} == {"phrase remove", "phrase background"}
    paths, rule, _ = select_training_images(rows, "a", 2)
    assert rule == "all-kept" and sorted(map(str, paths)) == sorted(r["path"] for r in exemplars)
    assert generator_exemplars(rows, "kept-edits", min_images=3) == {}


def test_several_multiples_generate_the_largest_and_nest_the_smaller():
    """generate.per_class [2, 1, 2] is the list [1, 2]: the stage plans 2x, job i of a class is the same image in
    either plan, and each job names the smallest multiple that includes it, so retraining at 1x keeps exactly
    the 1x plan's images."""
    import pytest
    from pydantic import ValidationError

    from tasks.generate import images_per_class, mark_choices, with_multiple

    config = GenerateConfig(per_class=[2, 1, 2])
    assert config.per_class == [1.0, 2.0] and config.per_class_choices() == [1.0, 2.0]
    assert GenerateConfig(per_class=[3]).per_class == 3.0 and GenerateConfig(per_class=3).per_class_choices() is None
    for bad in ([], [1, -2], [0], [1, 1.0000001]):  # the last two print alike as model-x1
        with pytest.raises(ValidationError):
            GenerateConfig(per_class=bad)
    with pytest.raises(ValidationError, match="need a generator"):
        GenerateConfig(backend="edits", per_class=[1, 2])
    rows = [{"split": "train", "class_name": c, "label": i, "group": None} for i, c in enumerate("ab") for _ in range(3)]
    assert images_per_class(rows, config) == {"a": 6, "b": 6} and images_per_class(rows, config, 1.0) == {"a": 3, "b": 3}
    jobs = plan_jobs(images_per_class(rows, config), {"a": 0, "b": 1}, seed=7)
    marked = mark_choices(jobs, {m: images_per_class(rows, config, m) for m in config.per_class_choices()})
    small = plan_jobs(images_per_class(rows, config, 1.0), {"a": 0, "b": 1}, seed=7)
    made = [{**j, "source": "generated"} for j in marked]
    kept = with_multiple(rows + made, 1.0)
    assert [{k: v for k, v in r.items() if k not in ("per_class_from", "source")} for r in kept[len(rows):]] == small
    assert kept[:len(rows)] == rows and with_multiple(rows + made, 2.0) == rows + made
    unmarked = [{"source": "generated", "per_class_from": None}, {"source": "generated", "per_class_from": float("nan")}]
    assert with_multiple(unmarked, 1.0) == unmarked  # read back from a table without the mark: kept
