"""Every kind of bad data in ``tests/bad_data.py``: quarantined with its reason, rejected in one line naming the file
(and row) before anything runs, or loaded correctly; never a crash and never a silent drop."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from bad_data import KINDS, Kind, base_dataset

from aspire.config import RunConfig
from aspire.images import check_images, load_rgb
from aspire.manifest import ManifestError
from aspire.readers import DatasetError
from tasks.ingest import list_dataset


def planted(tmp_path: Path, kind: Kind) -> tuple[RunConfig, int, Path]:
    root = tmp_path / "data"
    n = base_dataset(root)
    at_fault = kind.plant(root)
    config = RunConfig(workdir=tmp_path / "run", dataset={"format": "hf-imagefolder", "root": root})
    return config, n, at_fault


@pytest.mark.parametrize("kind", [k for k in KINDS if k.expect == "rejected"], ids=lambda k: k.name)
def test_rejected_in_one_line_naming_the_file(tmp_path: Path, kind: Kind) -> None:
    config, _, at_fault = planted(tmp_path, kind)
    with pytest.raises((DatasetError, ManifestError)) as caught:
        list_dataset(config)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(kind.words, message), message
    assert str(at_fault) in message, message
    assert kind.names in message, message


@pytest.mark.parametrize("kind", [k for k in KINDS if k.expect == "quarantined"], ids=lambda k: k.name)
def test_quarantined_with_its_reason_and_nothing_else_dropped(tmp_path: Path, kind: Kind) -> None:
    config, n, at_fault = planted(tmp_path, kind)
    rows = list_dataset(config)
    assert len(rows) == n + 1
    good, quarantine = check_images(rows)
    assert [q["path"] for q in quarantine] == [str(at_fault)]
    assert re.search(kind.words, quarantine[0]["reason"]), quarantine[0]["reason"]
    assert len(good) == n


@pytest.mark.parametrize("kind", [k for k in KINDS if k.expect == "loaded"], ids=lambda k: k.name)
def test_loaded_as_the_image_a_viewer_shows(tmp_path: Path, kind: Kind) -> None:
    config, n, at_fault = planted(tmp_path, kind)
    rows = list_dataset(config)
    good, quarantine = check_images(rows)
    assert not quarantine and len(good) == len(rows)
    if not at_fault.name.startswith("metadata"):
        assert len(rows) == n + 1
        image = load_rgb(at_fault)
        assert image.mode == "RGB" and image.size == kind.expect_size
        if kind.expect_pixel:
            centre = np.asarray(image)[image.height // 2, image.width // 2].astype(int)
            assert np.abs(centre - kind.expect_pixel).max() <= 12, centre


def test_every_kind_the_issue_lists_is_in_the_corpus() -> None:
    assert len(KINDS) >= 20 and len({k.name for k in KINDS}) == len(KINDS)
    assert {k.expect for k in KINDS} == {"quarantined", "rejected", "loaded"}


def test_odd_images_export_as_the_pixels_the_pipeline_saw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's loader clips 16-bit images and ignores EXIF orientation; ``datasets`` keeps CMYK, palette and
    16-bit modes: the export writes such images as the RGB the pipeline trained on, so both read what it saw."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets
    import torchvision

    from aspire.imagefolder import write_imagefolder

    root = tmp_path / "data"
    base_dataset(root)
    for kind in KINDS:
        if kind.expect == "loaded" and kind.expect_pixel:
            kind.plant(root)
    config = RunConfig(workdir=tmp_path / "run", dataset={"format": "hf-imagefolder", "root": root})
    rows = [r for r in list_dataset(config) if r["split"] == "train"]
    seen = {r["image_id"]: np.asarray(load_rgb(r["path"])) for r in rows}
    written = write_imagefolder(rows, tmp_path / "out")

    folder = torchvision.datasets.ImageFolder(str(tmp_path / "out" / "train"))
    by_path = {path: np.asarray(folder.loader(path)) for path, _ in folder.samples}
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    by_name = {Path(r["path"]).name: r for r in written}
    hf = {}
    for example in loaded["train"]:
        image = example["image"]
        hf[Path(image.filename).name] = np.asarray(image.convert("RGB") if image.mode in ("RGB", "L") else image)
    for row in written:
        expected = seen[row["image_id"]]
        assert np.array_equal(by_path[row["path"]], expected), row["image_id"]
        assert np.array_equal(hf[Path(row["path"]).name], expected), row["image_id"]
    assert len(by_name) == len(rows)
