"""The Hard-Spurious-ImageNet compositor: sources (VOC and CSV boxes), scores, geometry, the plan, and the
`aspire compose` flow on a small ImageNet-style tree the tests write."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from aspire.compose import (
    GROUPS,
    PlanError,
    category,
    class_scores,
    image_scores,
    object_size,
    paste,
    placement,
    plan,
)
from aspire.config import ComposeSettings, SplitCounts
from aspire.imagenet import SourceError, parse_loc_csv, parse_voc, read_imagenet
from tests.imagenet_tree import CLASSES, make_tree

SMALL = {"sizes": [16, 24, 32], "canvas": 64, "counts": {"train_easy": 3, "train_other": 1, "val": 2, "test": 3}}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return {fmt: make_tree(root / fmt, fmt) for fmt in ("voc", "csv")}


# -- sources --------------------------------------------------------------------------------------------


def test_voc_and_csv_boxes_give_the_same_sources(trees):
    voc, csv_ = read_imagenet(trees["voc"]), read_imagenet(trees["csv"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows]
    assert strip(voc.rows) == strip(csv_.rows) and len(voc.rows) == 4 * (12 + 4)
    assert voc.without_box == {w: 2 for w in CLASSES}  # unannotated train images are counted, not composed
    assert {r["pool"] for r in voc.rows} == {"train", "val"}
    val = [r for r in voc.rows if r["pool"] == "val"]
    assert all(Path(r["path"]).parent.name == "val" for r in val)  # flat val: class from the boxes
    assert Counter(r["wnid"] for r in val) == {w: 4 for w in CLASSES}
    assert voc.rows[0]["class_name"] == "red fish"  # from LOC_synset_mapping.txt


def test_classes_by_wnid_or_name_and_errors_name_the_file(trees, tmp_path):
    assert {r["wnid"] for r in read_imagenet(trees["voc"], classes=["green frog", "n00000003"]).rows} == \
        {"n00000002", "n00000003"}
    with pytest.raises(SourceError, match="class 'zebra' is not in the source tree"):
        read_imagenet(trees["voc"], classes=["zebra"])
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size><width>10</width></size></annotation>")
    with pytest.raises(SourceError, match="bad.xml: not a PASCAL VOC annotation"):
        parse_voc(bad)
    bad_csv = tmp_path / "LOC_val_solution.csv"
    bad_csv.write_text("ImageId,PredictionString\nx,n1 1 2 3\n")
    with pytest.raises(SourceError, match="LOC_val_solution.csv:2: PredictionString must repeat"):
        parse_loc_csv(bad_csv)
    with pytest.raises(SourceError, match="no such folder"):
        read_imagenet(tmp_path)


def test_a_broken_annotation_is_quarantined_and_the_rest_is_read(tmp_path):
    root = make_tree(tmp_path / "tree", "voc", train=3, val=1, unboxed=0, classes=("n00000001",))
    xml = next((root / "Annotations" / "CLS-LOC" / "train" / "n00000001").glob("*.xml"))
    xml.write_text("<annotation><size>")
    sources = read_imagenet(root)
    assert [q["image_id"] for q in sources.quarantine] == [xml.stem]
    assert "not a PASCAL VOC annotation" in sources.quarantine[0]["reason"] and len(sources.rows) == 3


# -- scores and geometry ---------------------------------------------------------------------------------


def test_centeredness_and_size_scores_follow_eq_1_and_2():
    assert image_scores(100, 50, [[25, 12.5, 75, 37.5]]) == (1.0, 0.25)  # centred, half of each side
    c, s = image_scores(100, 100, [[80, 0, 100, 20]])  # top-right corner: centre (0.9, 0.1)
    assert c == pytest.approx(0.6) and s == pytest.approx(0.04)
    c, s = image_scores(100, 100, [[25, 25, 75, 75], [80, 0, 100, 20]])  # mean over the image's objects
    assert c == pytest.approx(0.8) and s == pytest.approx(0.145)
    rows = [{"wnid": "a", "class_name": "A", "width": 100, "height": 100, "boxes": [[25, 25, 75, 75]]},
            {"wnid": "a", "class_name": "A", "width": 100, "height": 100, "boxes": [[80, 0, 100, 20], [0, 0, 10, 10]]}]
    (score,) = class_scores(rows)
    assert score["images"] == 2 and score["objects"] == 3
    assert score["centeredness"] == pytest.approx((1.0 + (0.6 + 0.55) / 2) / 2, abs=1e-4)


def test_categories_of_the_paper():
    sizes = [56, 84, 112]
    table = {(g, s): category(g, s, sizes) for g in GROUPS for s in sizes}
    assert {k for k, v in table.items() if v == "easy"} == {("CeO", 84), ("CeO", 112), ("CoO", 84), ("CoO", 112)}
    assert {k for k, v in table.items() if v == "hard"} == {("CeR", 56), ("CeR", 84), ("CoR", 56), ("CoR", 84)}
    assert sum(v == "medium" for v in table.values()) == 4


def test_object_sizes_square_and_aspect_preserving_with_the_canvas_clamp():
    assert object_size(300, 100, 56, "square", 224) == (56, 56)
    assert object_size(300, 100, 56, "preserve", 224) == (168, 56)  # shorter side to 56
    assert object_size(300, 100, 112, "preserve", 224) == (224, 75)  # 336 > 224: longer side clamped
    assert object_size(50, 400, 84, "preserve", 224) == (28, 224)
    assert object_size(100, 100, 84, "preserve", 224) == (84, 84)


def test_placement_centre_and_corners():
    assert placement(56, 56, "center", 224) == (84, 84)
    assert placement(56, 30, "top-right", 224) == (168, 0)
    assert placement(56, 30, "top-left", 224) == (0, 0)
    assert placement(56, 30, "bottom-left", 224) == (0, 194)
    assert placement(56, 30, "bottom-right", 224) == (168, 194)


def test_paste_copies_or_alpha_blends():
    background = np.zeros((8, 8, 3), np.uint8)
    out = paste(background, np.full((2, 3, 3), 200, np.uint8), 5, 0)
    assert (out[0:2, 5:8] == 200).all() and out.sum() == 200 * 18 and background.sum() == 0
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[0, 0, 3], rgba[1, 1, 3] = 100, 255, 128
    out = paste(background, rgba, 0, 0)
    assert out[0, 0, 0] == 100 and out[0, 1, 0] == 0 and out[1, 1, 0] == 50


# -- the plan --------------------------------------------------------------------------------------------


def planned(trees, **changes):
    settings = ComposeSettings(**{**SMALL, **changes})
    sources = read_imagenet(trees["voc"])
    names = {r["wnid"]: r["class_name"] for r in sources.rows}
    foreground = [w for w in sorted(names) if settings.variant == "v1" or w not in settings.v2_backgrounds]
    return plan(sources.rows, foreground, settings, names, settings.variant), sources, foreground


def test_plan_counts_disjoint_splits_distinct_sources_and_determinism(trees):
    rows, sources, foreground = planned(trees)
    counts = Counter((r["split"], r["wnid"], r["group_name"]) for r in rows)
    for (split, _, name), n in counts.items():
        letters, size = name[:3], int(name[3:])
        want = {"val": 2, "test": 3}.get(split) or (3 if category(letters, size, [16, 24, 32]) == "easy" else 1)
        assert n == want, (split, name)
    assert len(counts) == 3 * 4 * 12  # every split x class x group
    pool_of = {r["image_id"]: r["pool"] for r in sources.rows}
    used = {split: {r[k] for r in rows if r["split"] == split for k in ("foreground_image", "background_image")}
            for split in ("train", "val", "test")}
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    assert {pool_of[i] for i in used["test"]} == {"val"} and {pool_of[i] for i in used["train"] | used["val"]} == {"train"}
    for key in counts:  # distinct foreground sources within a group
        mine = [r["foreground_image"] for r in rows if (r["split"], r["wnid"], r["group_name"]) == key]
        assert len(set(mine)) == len(mine)
    for r in rows:
        assert (r["background_image"] == r["foreground_image"]) == r["letters"].endswith("O")
        assert r["letters"].endswith("O") or r["background_wnid"] != r["wnid"]
        assert r["position"] == ("center" if r["letters"].startswith("Ce") else "top-right")
    assert planned(trees)[0] == rows
    assert planned(trees, seed=1)[0] != rows


def test_random_test_corners_v2_backgrounds_and_too_few_sources(trees):
    rows, _, _ = planned(trees, test_corner="random")
    corners = Counter(r["position"] for r in rows if r["split"] == "test" and r["letters"].startswith("Co"))
    assert set(corners) <= {"top-right", "top-left", "bottom-left", "bottom-right"} and len(corners) >= 3
    assert {r["position"] for r in rows if r["split"] != "test" and r["letters"].startswith("Co")} == {"top-right"}

    rows, _, foreground = planned(trees, variant="v2", v2_backgrounds=["n00000004"])
    assert "n00000004" not in foreground and {r["wnid"] for r in rows} == set(foreground)
    assert {r["background_wnid"] for r in rows if r["letters"].endswith("R")} == {"n00000004"}

    with pytest.raises(PlanError, match=r"split test: group CeO at 16 px needs 5 distinct source images, the val "
                                        r"pool has 4"):
        planned(trees, counts=SplitCounts(train_easy=1, train_other=1, val=1, test=5))


# -- the flow --------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, root: Path, name: str = "run", **compose) -> Path:
    config = {"workdir": str(tmp_path / name), "source": {"format": "imagenet", "root": str(root)},
              "compose": {**SMALL, **compose}, "runner": {"shard_size": 100}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def compose(config: Path, *overrides: str) -> dict:
    from flows.compose import compose_flow

    return compose_flow(config_path=str(config), overrides=list(overrides))


@pytest.mark.usefixtures("prefect_server")
def test_compose_flow_writes_exact_counts_geometry_and_caches(trees, tmp_path):
    import datasets

    config = write_config(tmp_path, trees["csv"])
    summary = compose(config)
    out = tmp_path / "run" / "dataset"
    assert summary["images"] == 4 * (20 + 24 + 36) and summary["backgrounds"]["cached"] is False
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out))  # splits train, validation, test
    rows = {split: list(loaded[name]) for split, name in (("train", "train"), ("val", "validation"), ("test", "test"))}
    for split, n in (("train", 20), ("val", 24), ("test", 36)):
        assert Counter(r["wnid"] for r in rows[split]) == {w: n for w in CLASSES}
        assert len({r["group_name"] for r in rows[split]}) == 12
    # Geometry: the object's colour fills its planned box, at the planned place.
    for r in rows["test"][:: 7]:
        x0, y0, x1, y1 = json.loads(r["object_box"]) if isinstance(r["object_box"], str) else r["object_box"]
        assert (x1 - x0, y1 - y0) == (r["size"], r["size"])
        assert (x0, y0) == placement(r["size"], r["size"], r["position"], 64)
        image = np.asarray(r["image"].convert("RGB")).astype(int)
        inner = image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3).mean(0)
        assert np.abs(inner - CLASSES[r["wnid"]][2]).max() < 40, (r["image_id"], inner)

    before = files_digest(out)
    again = compose(config)
    assert again["backgrounds"]["cached"] and again["compose"]["cached"]  # recomposes nothing
    assert files_digest(out) == before

    # Same seed, another workdir: the same files. Other sizes: recomposed, backgrounds reused.
    compose(write_config(tmp_path, trees["csv"], name="twin"))
    assert files_digest(tmp_path / "twin" / "dataset") == before
    resized = compose(config, "compose.sizes=[20, 28, 40]")
    assert resized["backgrounds"]["cached"] and not resized["compose"]["cached"]
    assert {r["size"] for r in datasets.load_dataset("imagefolder", data_dir=str(out))["test"]} == {20, 28, 40}


@pytest.mark.usefixtures("prefect_server")
def test_aspect_preserving_segmenter_masks_and_robust_trainer_input(trees, tmp_path):
    from aspire.config import ClassifierConfig, DatasetConfig
    from aspire.readers import read_dataset
    from aspire.robust import make_trainer

    config = write_config(tmp_path, trees["voc"], aspect="preserve", mask="segmenter", test_corner="random")
    compose(config, "remove.segment=grabcut", "remove.inpaint=opencv")
    rows = read_dataset(DatasetConfig(format="hf-imagefolder", root=tmp_path / "run" / "dataset"))
    assert {r["variant"] for r in rows} == {"v1-sam"}
    for r in rows:
        x0, y0, x1, y1 = r["object_box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        if r["split"] == "test":  # the AR-preserving variant is a test set (Sec. 4): shorter side, or clamped
            assert r["aspect"] == "preserve"
            assert min(x1 - x0, y1 - y0) == int(r["size"]) or max(x1 - x0, y1 - y0) == 64
        else:  # train and val stay square
            assert r["aspect"] == "square" and x1 - x0 == y1 - y0 == int(r["size"])
    assert any(x1 - x0 != y1 - y0 for x0, y0, x1, y1 in (r["object_box"] for r in rows if r["split"] == "test"))
    objects = list((tmp_path / "run" / "backgrounds").rglob("object.png"))
    assert objects and all(Image.open(p).mode == "RGBA" for p in objects)
    groups = {(r["group"], r["group_name"]) for r in rows}
    assert len(groups) == 12 and len({g for g, _ in groups}) == 12  # the four letters x size
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    result = make_trainer("groupdro").train(train, val, ClassifierConfig(arch="small-cnn", image_size=32, epochs=1,
                                                                         batch_size=32, device="cpu"), seed=0)
    assert set(result.extras["q"]) == {g for g, _ in groups}


@pytest.mark.usefixtures("prefect_server")
def test_cli_compose_reports_counts_and_names_a_plan_error(trees, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    import shutil

    root = tmp_path / "tree"
    shutil.copytree(trees["voc"], root)
    broken = root / "train" / "n00000002" / "n00000002_3.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: quarantined, the counts are still met
    config = write_config(tmp_path, root)
    result = CliRunner().invoke(app, ["compose", str(config), "--set", "compose.counts.test=9"])
    assert result.exit_code == 2 and "needs 9 distinct source images" in result.output
    result = CliRunner().invoke(app, ["compose", str(config)])
    assert result.exit_code == 0 and "test/hard" in result.output and "320 images" in result.output
    assert "quarantined 1 source images" in result.output
    summary = json.loads((tmp_path / "run" / "compose.json").read_text())
    assert [q["image_id"] for q in summary["quarantine"]] == ["n00000002_3"]


# -- real backends through the backgrounds step, and a manifest source -------------------------------------


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_backgrounds_with_segment_anything_masks_and_lama(trees, tmp_path, monkeypatch):
    import torch
    from segment_anything import sam_model_registry

    from aspire.config import ComposeRunConfig
    from tasks.compose import run_backgrounds
    from tests.test_inpainters import HalfGrey
    from tests.test_segmenters import TINY, sam_config, save_sam_checkpoint, tiny_sam

    monkeypatch.setitem(sam_model_registry, TINY, tiny_sam)
    lama = tmp_path / "big-lama.pt"
    torch.jit.script(HalfGrey()).save(str(lama))
    monkeypatch.setenv("LAMA_MODEL", str(lama))
    remove = sam_config(save_sam_checkpoint(tmp_path / "sam.pth", 0)).model_copy(
        update={"inpaint": "lama", "dilate": 3, "max_side": 1024, "batch_size": 4})
    config = ComposeRunConfig.model_construct(
        workdir=tmp_path, source=None, remove=remove, compose=ComposeSettings(**{**SMALL, "mask": "segmenter"}))
    sources = read_imagenet(trees["voc"]).rows[:5]
    out = tmp_path / "prepared"
    out.mkdir()
    result = run_backgrounds(sources, out, config)
    assert [r["image_id"] for r in result.rows] == [r["image_id"] for r in sources] and not result.quarantine
    for row in result.rows:
        background = np.asarray(Image.open(row["background_path"]))
        assert background.shape == (64, 64, 3)
        obj = Image.open(row["object_path"])
        x0, y0, x1, y1 = max(row["boxes"], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        assert obj.mode == "RGBA" and obj.size == (int(x1 - x0), int(y1 - y0))  # the box, alpha = SAM's mask
        assert 0 < row["hole_fraction"] <= 1


def test_manifest_sources_from_the_synthetic_benchmark(tmp_path):
    from aspire.imagenet import read_manifest_sources
    from aspire.synth import SynthConfig, draw_benchmark

    rows = draw_benchmark(SynthConfig(image_size=32, train_per_class=6, val_per_group=1, test_per_group=1), tmp_path)
    sources = read_manifest_sources(rows, classes=["dog", "car"])
    assert {r["wnid"] for r in sources.rows} == {"dog", "car"} and sources.without_box == {}
    assert Counter(r["pool"] for r in sources.rows) == {
        "train": sum(r["split"] in ("train", "val") and r["class_name"] in ("dog", "car") for r in rows),
        "val": sum(r["split"] == "test" and r["class_name"] in ("dog", "car") for r in rows)}
    by_id = {r["image_id"]: r for r in rows}
    for source in sources.rows:  # only the class's own box, not the planted object's
        (box,) = [b["box"] for b in by_id[source["image_id"]]["boxes"] if b["phrase"] == source["class_name"]]
        assert source["boxes"] == [list(map(float, box))]


def test_backgrounds_are_inpainted_under_segmenter_masks_without_the_sam_variant(tmp_path):
    """Sec. 3.3 / App. C: the object is removed under its (SAM) mask dilated by 15 whatever compose.mask is;
    compose.mask=segmenter (the App. E variant) only adds the mask as the pasted object's alpha."""
    from aspire.config import ComposeRunConfig
    from tasks.compose import run_backgrounds

    image = Image.new("RGB", (96, 96), (40, 140, 40))
    ImageDraw.Draw(image).ellipse((30, 30, 66, 66), fill=(220, 30, 30))
    image.save(tmp_path / "src.png")
    row = {"image_id": "a", "path": str(tmp_path / "src.png"), "boxes": [[24.0, 24.0, 72.0, 72.0]]}

    def prepare(name: str, **settings) -> dict:
        config = ComposeRunConfig.model_validate({
            "workdir": str(tmp_path), "source": {"format": "imagenet", "root": str(tmp_path)},
            "compose": {"canvas": 64, "sizes": [32], **settings.pop("compose", {})},
            "remove": {"inpaint": "opencv", "dilate": 0, **settings}})
        (tmp_path / name).mkdir()
        return run_backgrounds([row], tmp_path / name, config).rows[0]

    box = prepare("box", segment="box")
    masked = prepare("grabcut", segment="grabcut")
    assert masked["hole_fraction"] < box["hole_fraction"]  # the disc, not its box
    assert Image.open(masked["object_path"]).mode == "RGB"  # no alpha without compose.mask=segmenter
    sam_variant = prepare("variant", segment="grabcut", compose={"mask": "segmenter"})
    assert Image.open(sam_variant["object_path"]).mode == "RGBA"
