"""The remove stage over weight-free backends and a rule classifier: keep rule, records, edge cases, failures."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from aspire.config import ClassifierConfig, RemoveConfig
from tasks.grounders import AnnotationsGrounder
from tasks.inpainters import OpenCVInpainter
from tasks.remove import run_remove
from tasks.segmenters import BoxSegmenter

CONFIG = RemoveConfig(ground="annotations", segment="box", inpaint="opencv", dilate=3, max_side=256, batch_size=4)


class RedMeansZero(nn.Module):
    """Predicts class 0 when an image has clearly red pixels, else class 1 (inputs are ImageNet-normalised)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        red = (x[:, 0] > 1.0) & (x[:, 1] < 0.0)  # high red, low green after normalisation
        score = red.float().mean(dim=(1, 2)) * 100
        return torch.stack([score, torch.full_like(score, 0.5)], dim=1)


CLASSIFIER = (RedMeansZero(), ClassifierConfig(arch="small-cnn", image_size=32, device="cpu", batch_size=4), ["a", "b"])


def picture(path: Path, size=(64, 64), mode="RGB", red_box=(20, 20, 36, 36)) -> Path:
    image = Image.new("RGB", size, (128, 128, 128))
    if red_box:
        image.paste((230, 20, 20), red_box)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def row(image_id: str, path: Path, foreground: list[str], boxes: list[dict], **extra) -> dict:
    return {"image_id": image_id, "path": str(path), "label": 0, "class_name": "a", "split": "train",
            "source": "original", "foreground": foreground, "boxes": boxes, "extract_error": None, **extra}


def attempts(result):
    return {r["image_id"]: r for r in result.rows if r.get("source") == "edit-remove"}


def test_removing_the_red_object_flips_and_is_kept(tmp_path):
    rows = [row("x", picture(tmp_path / "x.png"), ["red square", "tree"],
                [{"phrase": "square", "box": [20, 20, 36, 36]}])]
    result = run_remove(rows, CONFIG, AnnotationsGrounder(), BoxSegmenter(), OpenCVInpainter(CONFIG), CLASSIFIER, tmp_path)
    found = attempts(result)
    square, tree = found["x::remove::0"], found["x::remove::1"]
    assert square["kept"] and square["pred"] == 1 and square["boxes"] == [[20, 20, 36, 36]]
    assert 0 < square["mask_fraction"] < 0.2 and Path(square["path"]).parent == tmp_path
    assert not np.any(np.asarray(Image.open(square["path"]))[..., 0] > 200)  # the red is gone
    assert tree["skip_reason"] == "no detection" and tree["path"] == rows[0]["path"]
    assert result.rows[0] == rows[0]  # inputs pass through unchanged
    assert result.stats == {"edits_tried": 1, "edits_kept": 1, "skipped": 1}


def test_edits_that_do_not_flip_are_recorded_not_saved(tmp_path):
    rows = [row("x", picture(tmp_path / "x.png", red_box=(0, 0, 64, 64)), ["gray patch"],
                [{"phrase": "patch", "box": [40, 40, 60, 60]}])]
    found = attempts(run_remove(rows, CONFIG, AnnotationsGrounder(), BoxSegmenter(), OpenCVInpainter(CONFIG),
                                CLASSIFIER, tmp_path))
    only = found["x::remove::0"]
    assert only["skip_reason"] is None and not only["kept"] and only["pred"] == 0 and only["path"] == rows[0]["path"]
    assert not list(tmp_path.glob("*__remove__*"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_is_edited(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"x{suffix}"
    if mode == "I;16":
        Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(path)
    else:
        picture(path, mode=mode)
    rows = [row("x", path, ["square"], [{"phrase": "square", "box": [20, 20, 36, 36]}])]
    found = attempts(run_remove(rows, CONFIG, AnnotationsGrounder(), BoxSegmenter(), OpenCVInpainter(CONFIG),
                                CLASSIFIER, tmp_path))
    assert found["x::remove::0"]["skip_reason"] is None and found["x::remove::0"]["pred"] is not None


def test_edge_cases_get_reasons(tmp_path):
    big = picture(tmp_path / "big.png", size=(1200, 900), red_box=(300, 300, 500, 500))
    small = picture(tmp_path / "small.png")
    rows = [
        row("big", big, ["square"], [{"phrase": "square", "box": [300, 300, 500, 500]}]),
        row("tiny", small, ["dot"], [{"phrase": "dot", "box": [10, 10, 11, 11]}]),
        row("whole", small, ["wall"], [{"phrase": "wall", "box": [0, 0, 64, 64]}]),
        row("none", small, [], []),
        row("failed", small, ["x"], [], extract_error="malformed answer"),
        row("gone", tmp_path / "missing.png", ["square"], [{"phrase": "square", "box": [1, 1, 9, 9]}]),
    ]
    found = attempts(run_remove(rows, CONFIG, AnnotationsGrounder(), BoxSegmenter(), OpenCVInpainter(CONFIG),
                                CLASSIFIER, tmp_path))
    assert found["big::remove::0"]["kept"]  # downscaled to 256 px, boxes scaled with it
    assert Image.open(found["big::remove::0"]["path"]).size == (256, 192)
    assert found["tiny::remove::0"]["skip_reason"] == "boxes too small"
    assert found["whole::remove::0"]["skip_reason"].startswith("mask covers 100%")
    assert found["none::remove::0"]["skip_reason"] == "no foreground phrase"
    assert found["failed::remove::0"]["skip_reason"] == "no extraction: malformed answer"
    assert found["gone::remove::0"]["skip_reason"] == "image: missing file"


class Broken:
    identity = "broken"

    def ground(self, image, phrases, row):
        raise RuntimeError("CUDA out of memory")

    def inpaint(self, images, masks):
        raise RuntimeError("inpainter crashed")


def test_failing_backends_leave_records_and_the_stage_completes(tmp_path):
    rows = [row("x", picture(tmp_path / "x.png"), ["square", "tree"], [{"phrase": "square", "box": [20, 20, 36, 36]}])]
    found = attempts(run_remove(rows, CONFIG, Broken(), BoxSegmenter(), OpenCVInpainter(CONFIG), CLASSIFIER, tmp_path))
    assert {r["skip_reason"] for r in found.values()} == {"RuntimeError: CUDA out of memory"} and len(found) == 2
    found = attempts(run_remove(rows, CONFIG, AnnotationsGrounder(), BoxSegmenter(), Broken(), CLASSIFIER, tmp_path))
    assert found["x::remove::0"]["skip_reason"] == "inpainting failed: RuntimeError: inpainter crashed"
