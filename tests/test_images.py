"""Image loading, quarantine, and the image-folder round trip through Hugging Face datasets and torchvision."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aspire.imagefolder import safe_name, write_imagefolder
from aspire.images import ImageError, check_images, load_rgb
from aspire.readers import read_dataset


def save(image: Image.Image, path: Path, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def noisy_jpeg_bytes(size: int = 32) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def row(image_id: str, path: Path | str, **kwargs: Any) -> dict[str, Any]:
    return {"image_id": image_id, "path": str(path), "label": 0, "class_name": "cat", "split": "train", **kwargs}


# ------------------------------------------------------------------------------------------------ load_rgb


@pytest.mark.parametrize(
    "name, make",
    [
        ("gray.png", lambda: Image.new("L", (8, 8), 128)),
        ("rgba.png", lambda: Image.new("RGBA", (8, 8), (10, 20, 30, 0))),
        ("palette.png", lambda: Image.new("P", (8, 8), 3)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0))),
        ("rgb.jpg", lambda: Image.new("RGB", (8, 8), (255, 0, 0))),
    ],
)
def test_load_rgb_converts_modes(tmp_path: Path, name: str, make: Any) -> None:
    image = load_rgb(save(make(), tmp_path / name))
    assert image.mode == "RGB" and image.size == (8, 8)


def test_load_rgb_scales_16_bit_grayscale(tmp_path: Path) -> None:
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[0, 0] = 0
    values[0, 1] = 257 * 100
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
    assert tuple(pixels[0, 0]) == (0, 0, 0) and tuple(pixels[0, 1]) == (100, 100, 100)
    assert tuple(pixels[5, 5]) == (255, 255, 255)


def test_load_rgb_cmyk_red(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "red.jpg", quality=100)
    r, g, b = np.asarray(load_rgb(path))[4, 4]
    assert r > 200 and g < 60 and b < 60


def test_load_rgb_errors_carry_path_and_reason(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        load_rgb(tmp_path / "nope.jpg")
    assert caught.value.reason == "missing file" and caught.value.path == str(tmp_path / "nope.jpg")
    assert str(tmp_path / "nope.jpg") in str(caught.value)


# ------------------------------------------------------------------------------------------------ quarantine


def test_check_images_quarantines_bad_files_with_distinct_reasons(tmp_path: Path) -> None:
    good_png = save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "good.png")
    good_jpg = tmp_path / "good.jpg"
    data = noisy_jpeg_bytes()
    good_jpg.write_bytes(data)
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not really a jpeg")
    rows = [
        row("good_png", good_png),
        row("half", tmp_path / "half.jpg"),
        row("empty", tmp_path / "empty.jpg"),
        row("good_jpg", good_jpg),
        row("missing", tmp_path / "missing.jpg"),
        row("text", tmp_path / "text.jpg"),
        row("folder", tmp_path / "folder.png"),
    ]
    (tmp_path / "folder.png").mkdir()
    good, quarantine = check_images(rows)

    assert [r["image_id"] for r in good] == ["good_png", "good_jpg"]
    reasons = {q["image_id"]: q["reason"] for q in quarantine}
    assert set(reasons) == {"half", "empty", "missing", "text", "folder"}
    assert reasons["folder"] == "a folder, not an image file"
    assert reasons["half"].startswith("truncated image: ")
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["missing"] == "missing file"
    assert reasons["text"].startswith("not an image: ")
    assert {q["path"] for q in quarantine if q["image_id"] == "half"} == {str(tmp_path / "half.jpg")}


# ------------------------------------------------------------------------------------------------ write_imagefolder


def test_safe_name() -> None:
    assert safe_name("a/b\\c") == "a_b_c"
    assert safe_name("..") == "x__"
    assert not safe_name(".hidden").startswith(".")
    assert not safe_name("__init").startswith("__")


def make_rows(src: Path) -> list[dict[str, Any]]:
    """Rows over 2 classes and 3 splits (train 4, val 2, test 2) with objects and boxes."""
    rows = []
    plan = [("train", 0), ("train", 1), ("train", 0), ("train", 1), ("val", 0), ("val", 1), ("test", 0), ("test", 1)]
    for i, (split, label) in enumerate(plan):
        suffix = ".png" if i % 2 else ".jpg"
        path = save(Image.new("RGB", (8, 8), (i * 20, 0, 0)), src / f"img{i}{suffix}")
        boxes = [{"phrase": "a dog", "box": [0, 0, 4, 4]}] if label else []
        rows.append({
            "image_id": f"{split}/img{i}", "path": str(path), "label": label,
            "class_name": ("land bird", "water/bird")[label], "split": split,
            "group": i % 4 if i != 5 else None, "source": "original",
            "objects": ["a dog"] if label else [], "boxes": boxes,
        })
    return rows


def test_write_imagefolder_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets
    import torchvision

    rows = make_rows(tmp_path / "src")
    out = tmp_path / "out"
    written = write_imagefolder(rows, out)

    assert [r["image_id"] for r in written] == [r["image_id"] for r in rows]
    assert written[1]["path"] == str(out / "train" / "water_bird" / "train_img1.png")
    assert all(Path(r["path"]).is_file() for r in written)
    assert (out / "train" / "metadata.parquet").is_file() and (out / "val" / "metadata.parquet").is_file()

    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf_cache"))
    assert {name: len(split) for name, split in loaded.items()} == {"train": 4, "validation": 2, "test": 2}
    assert sorted(loaded["train"]["label"]) == [0, 0, 1, 1]
    assert set(loaded["validation"]["class_name"]) == {"land bird", "water/bird"}
    assert loaded["test"][0]["image"].size == (8, 8)

    folder = torchvision.datasets.ImageFolder(str(out / "train"))
    assert folder.classes == ["land bird", "water_bird"] and len(folder) == 4

    back = read_dataset(_hf_config(out))
    columns = ("label", "class_name", "split", "objects", "boxes", "group", "source")
    assert {r["image_id"]: tuple(r[c] for c in columns) for r in back} == {
        r["image_id"]: tuple(r[c] for c in columns) for r in rows
    }
    assert {r["image_id"]: r["path"] for r in back} == {r["image_id"]: r["path"] for r in written}


def test_write_imagefolder_rejects_colliding_names(tmp_path: Path) -> None:
    rows = make_rows(tmp_path / "src")[:2]
    rows[1].update(image_id="train_img0", class_name="land bird", path=rows[0]["path"])
    rows[0]["image_id"] = "train/img0"
    with pytest.raises(ValueError, match="'train/img0' and 'train_img0'"):
        write_imagefolder(rows, tmp_path / "out")


def test_a_column_empty_in_a_whole_split_still_loads_in_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets

    rows = make_rows(tmp_path / "src")
    for r in rows:
        r["caption"] = "a bird" if r["split"] == "train" else None
        r["token"] = None
    write_imagefolder(rows, tmp_path / "out")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out"))
    assert loaded["validation"]["caption"] == [None, None] and set(loaded["train"]["caption"]) == {"a bird"}
    assert "token" not in loaded["train"].features  # set in no row: no column


def _hf_config(root: Path) -> Any:
    from aspire.config import DatasetConfig

    return DatasetConfig(format="hf-imagefolder", root=root)


def test_a_decompression_bomb_sized_image_is_quarantined_before_decoding(tmp_path: Path, monkeypatch) -> None:
    """A 144-MP image passed with a Pillow warning and was decoded in full every epoch."""
    import aspire.images

    big = save(Image.new("RGB", (300, 200), (1, 2, 3)), tmp_path / "big.png")
    monkeypatch.setattr(aspire.images, "MAX_PIXELS", 50_000)  # the same rule at a size a test can write
    good, quarantine = check_images([row("big", big)])
    assert not good and quarantine[0]["reason"].startswith("image too large: 300 x 200 = 0 MP, above 0 MP")
    monkeypatch.setattr(aspire.images, "MAX_PIXELS", 60_000)
    assert [r["image_id"] for r in check_images([row("big", big)])[0]] == ["big"]
