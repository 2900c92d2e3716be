"""Tests of the synthetic benchmark: planted statistics, balanced groups, boxes, captions, spec, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from aspire.manifest import Row, validate_rows
from aspire.synth import SynthConfig, draw_benchmark, group_index, group_names

REPO = Path(__file__).resolve().parents[1]


def small_config(**changes: object) -> SynthConfig:
    """The default classes/objects/backgrounds with small counts."""
    values = {"train_per_class": 200, "val_per_group": 1, "test_per_group": 2, "image_size": 48, "seed": 3}
    values.update(changes)
    return SynthConfig(**values)


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, Path, list[Row]]:
    config = small_config()
    out = tmp_path_factory.mktemp("synth")
    rows = draw_benchmark(config, out)
    return config, out, rows


def test_rows_are_a_valid_manifest(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    config, out, rows = drawn
    validate_rows(rows)
    n_groups = 2 * len(config.classes) * len(config.backgrounds)
    counts = Counter(row["split"] for row in rows)
    assert counts == {"train": 3 * 200, "val": n_groups * 1, "test": n_groups * 2}
    for row in rows:
        assert Path(row["path"]).is_file()
        assert Path(row["path"]).parent == out / row["split"] / row["class_name"]
        assert row["source"] == "synthetic"
        assert row["class_name"] == config.classes[row["label"]].name
        assert row["group"] == group_index(config, row["label"], row["scene"], row["has_object"])
        assert row["group_name"] == group_names(config)[row["group"]]
        planted = config.classes[row["label"]].object
        assert row["objects"] == ([planted] if row["has_object"] else [])
    with Image.open(rows[0]["path"]) as image:
        assert image.size == (48, 48) and image.mode == "RGB"


def test_train_planted_statistics(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    config, _, rows = drawn
    n = config.train_per_class
    for label, spec in enumerate(config.classes):
        train = [r for r in rows if r["split"] == "train" and r["label"] == label]
        assert len(train) == n
        for strength, hits in (
            (config.background_strength, sum(r["scene"] == spec.background for r in train)),
            (config.object_strength, sum(r["has_object"] for r in train)),
        ):
            tolerance = 4 * math.sqrt(strength * (1 - strength) / n) + 1 / n
            assert abs(hits / n - strength) <= tolerance, (spec.name, hits, n, strength)
        # Off-planted images use the other backgrounds, never the planted one.
        others = {r["scene"] for r in train if r["scene"] != spec.background}
        assert others <= {b.name for b in config.backgrounds} - {spec.background}


def test_strength_one_and_zero(tmp_path: Path) -> None:
    config = small_config(
        train_per_class=30, background_strength=1.0, object_strength=0.0, image_size=32,
        val_per_group=1, test_per_group=1,
    )
    rows = [r for r in draw_benchmark(config, tmp_path) if r["split"] == "train"]
    assert all(r["scene"] == config.classes[r["label"]].background for r in rows)
    assert not any(r["has_object"] for r in rows)


def test_val_test_groups_exactly_balanced(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    config, _, rows = drawn
    for split, per_group in (("val", config.val_per_group), ("test", config.test_per_group)):
        counts = Counter(
            (r["class_name"], r["scene"], r["has_object"]) for r in rows if r["split"] == split
        )
        expected = {
            (c.name, b.name, has): per_group
            for c in config.classes
            for b in config.backgrounds
            for has in (False, True)
        }
        assert counts == expected
        assert sorted({r["group"] for r in rows if r["split"] == split}) == list(range(len(expected)))
    assert group_names(config)[:2] == ["dog|snow|-sled", "dog|snow|+sled"]


def test_boxes_inside_and_core_box_has_class_color(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    config, _, rows = drawn
    size = config.image_size
    for row in rows[::7]:
        boxes = row["boxes"]
        assert boxes[0]["phrase"] == row["class_name"]
        assert [b["phrase"] for b in boxes[1:]] == row["objects"]
        for b in boxes:
            x0, y0, x1, y1 = b["box"]
            assert all(isinstance(v, int) for v in b["box"])
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        x0, y0, x1, y1 = boxes[0]["box"]
        assert 0.25 * size <= max(x1 - x0, y1 - y0) <= 0.5 * size
        with Image.open(row["path"]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        color = np.asarray(config.classes[row["label"]].color)
        near = np.abs(pixels - color).max(axis=2) <= 24
        inside = near[y0:y1, x0:x1].mean()
        assert inside >= 0.3, (row["image_id"], inside)
        assert near.sum() - near[y0:y1, x0:x1].sum() <= 0.02 * size * size  # the class colour stays in its box


def test_captions_vary_and_name_the_background(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    config, _, rows = drawn
    backgrounds = {b.name: b for b in config.backgrounds}
    objects = {o.name: o for o in config.objects}
    for spec in config.classes:
        class_rows = [r for r in rows if r["class_name"] == spec.name]
        wordings = {w for r in class_rows for w in spec.words if r["caption"].startswith(w + " ")
                    or r["caption"].startswith("a photo of " + w + " ")}
        assert len(wordings) >= 2, (spec.name, wordings)
        for row in class_rows:
            caption = row["caption"]
            assert any(caption.endswith(" " + w) for w in backgrounds[row["scene"]].words), caption
            mentions_object = any(w in caption for w in objects[spec.object].words)
            assert mentions_object == row["has_object"], caption
    assert len({r["caption"] for r in rows}) > 50


def test_metadata_csv_and_spec_json(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    config, out, rows = drawn
    for split in ("train", "val", "test"):
        with open(out / split / "metadata.csv", newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
        split_rows = [r for r in rows if r["split"] == split]
        assert [t["image_id"] for t in table] == [r["image_id"] for r in split_rows]
        assert all((out / split / t["file_name"]).is_file() for t in table)
        assert json.loads(table[0]["boxes"]) == split_rows[0]["boxes"]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["seed"] == 3
    assert spec["background_strength"] == 0.95 and spec["object_strength"] == 0.95
    assert spec["counts"]["train"] == 600 and spec["counts"]["test"] == 48
    dog = spec["classes"][0]
    assert dog["name"] == "dog" and dog["label"] == 0
    assert dog["background"]["name"] == "snow" and "in the snow" in dog["background"]["words"]
    assert dog["object"]["name"] == "sled" and "a sled" in dog["object"]["words"]
    assert spec["groups"] == group_names(config)
    assert SynthConfig.model_validate(spec["config"]) == config


def test_determinism_by_file_hashes(tmp_path: Path) -> None:
    config = small_config(train_per_class=15, image_size=32)
    rows_a = draw_benchmark(config, tmp_path / "a")
    draw_benchmark(config, tmp_path / "b")
    draw_benchmark(config, tmp_path / "c", seed=4)
    hashes_a, hashes_b, hashes_c = (file_hashes(tmp_path / name) for name in "abc")
    assert hashes_a == hashes_b
    assert hashes_a.keys() == hashes_c.keys()
    assert hashes_a != hashes_c
    assert sum(hashes_a[k] != hashes_c[k] for k in hashes_a if k.endswith(".png")) > 0.9 * len(rows_a)
    assert json.loads((tmp_path / "c" / "spec.json").read_text())["seed"] == 4


def test_config_validation() -> None:
    classes = [c.model_dump() for c in SynthConfig().classes]
    classes[0]["background"] = "snw"
    with pytest.raises(ValidationError, match=r"class 'dog': background 'snw'"):
        SynthConfig(classes=classes)
    classes = [c.model_dump() for c in SynthConfig().classes]
    classes[1]["object"] = "kite"
    with pytest.raises(ValidationError, match=r"class 'bird': object 'kite'"):
        SynthConfig(classes=classes)
    classes = [c.model_dump() for c in SynthConfig().classes]
    classes[1]["name"] = "dog"
    with pytest.raises(ValidationError, match="unique"):
        SynthConfig(classes=classes)
    with pytest.raises(ValidationError, match="image_size"):
        SynthConfig(image_size=16)
    with pytest.raises(ValidationError):
        SynthConfig(background_strength=1.5)
    with pytest.raises(ValidationError):
        SynthConfig(unknown_key=1)
    with pytest.raises(ValidationError):
        SynthConfig().image_size = 128  # frozen


def test_example_config_is_the_defaults() -> None:
    data = yaml.safe_load((REPO / "configs" / "synth.yaml").read_text())
    assert SynthConfig.model_validate(data) == SynthConfig()


def test_reads_back_unchanged_through_the_hf_imagefolder_reader(drawn: tuple[SynthConfig, Path, list[Row]]) -> None:
    from aspire.config import DatasetConfig
    from aspire.readers import read_dataset

    _, out, rows = drawn
    read = {r["image_id"]: r for r in read_dataset(DatasetConfig(format="hf-imagefolder", root=out))}
    assert set(read) == {r["image_id"] for r in rows}
    order = sorted({r["class_name"] for r in rows})  # labels renumbered in folder order, the spec's kept
    for row in rows:
        assert read[row["image_id"]] == {**row, "label": order.index(row["class_name"]), "dataset_label": row["label"]}


def test_negative_control_draws_backgrounds_and_objects_independent_of_the_class(tmp_path):
    config = small_config(train_per_class=600, image_size=32, background_strength=0.25, object_strength=1 / 3,
                          other_object_rate=1.0)
    train = [r for r in draw_benchmark(config, tmp_path) if r["split"] == "train"]
    for spec in config.classes:
        mine = [r for r in train if r["class_name"] == spec.name]
        backgrounds = Counter(r["scene"] for r in mine)
        objects = Counter(o for r in mine for o in r["objects"])
        assert all(abs(backgrounds[b.name] / len(mine) - 0.25) < 0.06 for b in config.backgrounds), backgrounds
        assert all(abs(objects[o.name] / len(mine) - 1 / 3) < 0.06 for o in config.objects), objects
        assert all(len(r["objects"]) == 1 and r["has_object"] == (r["objects"] == [spec.object]) for r in mine)
    other = next(r for r in train if r["objects"] and not r["has_object"])  # another class's object, drawn and captioned
    assert other["objects"][0] in other["caption"] or any(other["objects"][0] in b["phrase"] for b in other["boxes"])
    assert [b["phrase"] for b in other["boxes"]][1] == other["objects"][0]


def test_cue_probe_crosses_every_class_with_every_background_and_object() -> None:
    from aspire.synth import draw_cue_probe

    config = small_config()
    images, cells = draw_cue_probe(config, per_cell=2, seed=5)
    per_class = len(config.backgrounds) * (len(config.objects) + 1) * 2
    assert len(images) == len(cells) == len(config.classes) * per_class
    assert Counter(cells) == {c: 2 for c in set(cells)}
    assert {(label, config.classes[label].background, config.objects[0].name) for label in range(3)} <= set(cells)
    again, _ = draw_cue_probe(config, per_cell=2, seed=5)
    other, _ = draw_cue_probe(config, per_cell=2, seed=6)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_cue_reliance_says_which_cue_the_predictions_follow() -> None:
    from aspire.synth import cue_reliance, draw_cue_probe

    config = small_config()
    _, cells = draw_cue_probe(config, per_cell=1)
    names = [c.name for c in config.classes]
    by_background = {c.background: c.name for c in config.classes}
    by_object = {c.object: c.name for c in config.classes}
    shape = cue_reliance(config, cells, [names[label] for label, _, _ in cells])
    assert (shape["shape"], shape["background"], shape["object"]) == (1.0, 0.0, 0.0)
    background = cue_reliance(config, cells, [by_background.get(bg, names[label]) for label, bg, _ in cells])
    assert background["background"] == 1.0 and background["object"] < 1.0 and background["shape"] < 1.0
    # an object decides when present, the background otherwise: what the ERM model of a shortcut draw learns
    shortcut = [by_object.get(ob) or by_background.get(bg, names[label]) for label, bg, ob in cells]
    followed = cue_reliance(config, cells, shortcut)
    assert followed["object"] == 1.0 and 0 < followed["background"] < 1 and followed["shape"] < 0.5


def test_background_bank_holds_bank_per_background_distinct_images_of_each_background(tmp_path: Path) -> None:
    from aspire.synth import draw_background_bank

    config = SynthConfig(image_size=32, bank_per_background=9)
    folders = draw_background_bank(config, tmp_path / "bank")
    assert sorted(f.name for f in folders) == sorted(b.name for b in config.backgrounds)
    for folder in folders:
        files = sorted(folder.glob("*.png"))
        assert len(files) == 9
        assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 9  # no background repeats
    again = draw_background_bank(config.model_copy(update={"bank_per_background": 3}), tmp_path / "again")
    for folder in again:  # a smaller bank is the first images of the larger one
        assert len(list(folder.glob("*.png"))) == 3
        assert (folder / "002.png").read_bytes() == (tmp_path / "bank" / folder.name / "002.png").read_bytes()
