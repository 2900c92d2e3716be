"""Readers of every dataset format, on tiny on-disk fixtures built in tmp_path."""

from __future__ import annotations

import csv
import re
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from aspire.readers import DatasetError, read_dataset


def make_config(fmt: str, root: Path, **kwargs: Any) -> Any:
    """A DatasetConfig (imported here so a broken aspire.config only fails the tests that need it)."""
    from aspire.config import DatasetConfig

    return DatasetConfig(format=fmt, root=root, **kwargs)


def make_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """An 8x8 image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["image_id"]: row for row in rows}


# ------------------------------------------------------------------------------------------------ imagefolder


def test_imagefolder_without_split_folders_splits_each_class_deterministically(tmp_path: Path) -> None:
    for cls in ("dog", "cat"):
        for i in range(10):
            make_image(tmp_path / cls / f"{i:02d}.png")
    rows = read_dataset(make_config("imagefolder", tmp_path, val_fraction=0.2, seed=3))

    assert len(rows) == 20
    assert {(r["class_name"], r["label"]) for r in rows} == {("cat", 0), ("dog", 1)}
    for cls in ("cat", "dog"):
        splits = [r["split"] for r in rows if r["class_name"] == cls]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (6, 2, 2)
    assert all(r["group"] is None and r["source"] == "original" for r in rows)
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
    assert by_id(rows)["cat/03"]["path"] == str(tmp_path / "cat" / "03.png")
    again = read_dataset(make_config("imagefolder", tmp_path, val_fraction=0.2, seed=3))
    assert again == rows
    other_seeds = [read_dataset(make_config("imagefolder", tmp_path, val_fraction=0.2, seed=s)) for s in (4, 5)]
    assert any([r["split"] for r in other] != [r["split"] for r in rows] for other in other_seeds)


def test_imagefolder_with_split_folders_accepts_valid_as_val(tmp_path: Path) -> None:
    make_image(tmp_path / "train" / "cat" / "a.png")
    make_image(tmp_path / "train" / "dog" / "b.jpg")
    make_image(tmp_path / "valid" / "dog" / "c.png")
    make_image(tmp_path / "test" / "cat" / "d.jpeg")
    rows = by_id(read_dataset(make_config("imagefolder", tmp_path)))

    assert set(rows) == {"train/cat/a", "train/dog/b", "valid/dog/c", "test/cat/d"}
    assert rows["valid/dog/c"]["split"] == "val"
    assert rows["valid/dog/c"]["label"] == 1  # labels from the classes of all splits together
    assert rows["test/cat/d"]["label"] == 0 and rows["test/cat/d"]["split"] == "test"


def test_missing_root_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        read_dataset(make_config("imagefolder", tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ hf-imagefolder


def test_hf_imagefolder_per_split_csv_and_jsonl(tmp_path: Path) -> None:
    make_image(tmp_path / "train" / "cat" / "1.png")
    make_image(tmp_path / "train" / "dog" / "2.png")
    write_csv(
        tmp_path / "train" / "metadata.csv",
        ["file_name", "image_id", "label", "class_name", "group", "objects", "boxes", "background"],
        [
            ["cat/1.png", "c1", 0, "cat", 1, '["a cat"]', '[{"phrase":"a cat","box":[0,0,4,4]}]', "grass"],
            ["dog/2.png", "d2", 1, "dog", "", "", "", "water"],
        ],
    )
    make_image(tmp_path / "validation" / "3.png")
    with open(tmp_path / "validation" / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "3.png", "label": 1, "class_name": "dog", "objects": ["a dog"]}) + "\n")
    rows = by_id(read_dataset(make_config("hf-imagefolder", tmp_path)))

    assert set(rows) == {"c1", "d2", "val/3"}
    c1 = rows["c1"]
    assert c1["path"] == str(tmp_path / "train" / "cat" / "1.png")
    assert (c1["label"], c1["class_name"], c1["split"], c1["group"]) == (0, "cat", "train", 1)
    assert c1["objects"] == ["a cat"] and c1["boxes"] == [{"phrase": "a cat", "box": [0, 0, 4, 4]}]
    assert c1["background"] == "grass" and c1["source"] == "original"
    assert rows["d2"]["group"] is None and rows["d2"]["objects"] is None
    assert (rows["val/3"]["split"], rows["val/3"]["label"], rows["val/3"]["objects"]) == ("val", 1, ["a dog"])


def test_hf_imagefolder_root_metadata_with_split_column_and_folder_classes(tmp_path: Path) -> None:
    for name in ("cat/a.png", "dog/b.png", "dog/c.png"):
        make_image(tmp_path / "images" / name)
    write_csv(
        tmp_path / "metadata.csv",
        ["file_name", "split"],
        [["images/cat/a.png", "train"], ["images/dog/b.png", "val"], ["images/dog/c.png", "test"]],
    )
    rows = by_id(read_dataset(make_config("hf-imagefolder", tmp_path)))

    assert {k: (r["label"], r["class_name"], r["split"]) for k, r in rows.items()} == {
        "train/images/cat/a": (0, "cat", "train"),
        "val/images/dog/b": (1, "dog", "val"),
        "test/images/dog/c": (1, "dog", "test"),
    }


def test_hf_imagefolder_missing_file_name_column(tmp_path: Path) -> None:
    meta = write_csv(tmp_path / "train" / "metadata.csv", ["image", "label"], [["a.png", 0]])
    with pytest.raises(DatasetError, match=f"{re.escape(str(meta))}.*'file_name'"):
        read_dataset(make_config("hf-imagefolder", tmp_path))


def test_hf_imagefolder_root_metadata_without_split_column(tmp_path: Path) -> None:
    meta = write_csv(tmp_path / "metadata.csv", ["file_name", "label"], [["a.png", 0]])
    with pytest.raises(DatasetError, match=f"{re.escape(str(meta))}.*'split'"):
        read_dataset(make_config("hf-imagefolder", tmp_path))


def test_hf_imagefolder_bad_label_names_line_and_value(tmp_path: Path) -> None:
    meta = write_csv(tmp_path / "test" / "metadata.csv", ["file_name", "label"], [["a.png", "cat"]])
    with pytest.raises(DatasetError, match=f"{re.escape(str(meta))} line 2.*'label'.*'cat'"):
        read_dataset(make_config("hf-imagefolder", tmp_path))


@pytest.mark.parametrize("text, words", [
    ("file_name,label,class_name\na.png,0,cat\nb.png,1\n", r"line 3: fewer cells than columns in the header \(no 'class_name'\)"),
    ("file_name,label,class_name\na.png,0,cat\nb.png,,dog\n", "line 3: the 'label' cell is empty while other rows have one"),
    ("file_name,label,class_name\na.png,0,cat\nb.png,7,dog\n", "line 3: label 7 is out of range: 2 classes, labels 0..1"),
    ("file_name,label,class_name\na.png,0,cat\nb.png,0,dog\n", "line 3: label 0 with class 'dog', but"),
    ("file_name;label\na.png;0\n", "the delimiter looks like ';'"),
])
def test_hf_imagefolder_metadata_mistakes_name_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    """A short row used to drop the label column of the whole dataset, an out-of-range label crashed training."""
    meta = tmp_path / "train" / "metadata.csv"
    meta.parent.mkdir(parents=True)
    meta.write_text(text)
    with pytest.raises(DatasetError, match=f"{re.escape(str(meta))}.*{words}"):
        read_dataset(make_config("hf-imagefolder", tmp_path))


def test_hf_imagefolder_metadata_with_a_bom_reads_and_latin1_is_named(tmp_path: Path) -> None:
    meta = tmp_path / "train" / "metadata.csv"
    meta.parent.mkdir(parents=True)
    meta.write_bytes("\ufefffile_name,label,class_name\na.png,0,caf\u00e9\n".encode("utf-8"))
    (row,) = read_dataset(make_config("hf-imagefolder", tmp_path))
    assert (row["label"], row["class_name"]) == (0, "caf\u00e9")
    meta.write_bytes("file_name,label,class_name\na.png,0,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=f"{re.escape(str(meta))}: not UTF-8 text.*save it as UTF-8"):
        read_dataset(make_config("hf-imagefolder", tmp_path))


def test_hf_imagefolder_without_metadata(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no metadata file"):
        read_dataset(make_config("hf-imagefolder", tmp_path))


# ------------------------------------------------------------------------------------------------ waterbirds


def make_waterbirds(root: Path, header: list[str] | None = None) -> Path:
    header = header or ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    table = [
        [1, "001.Albatross/a.jpg", 1, 0, 1, "/o/ocean/x.jpg"],
        [2, "002.Sparrow/b.jpg", 0, 0, 1, "/o/ocean/y.jpg"],
        [3, "002.Sparrow/c.jpg", 0, 1, 0, "/b/bamboo/z.jpg"],
        [4, "001.Albatross/d.jpg", 1, 2, 0, "/b/bamboo/w.jpg"],
    ]
    for record in table:
        make_image(root / record[1])
    return write_csv(root / "metadata.csv", header, [r[: len(header)] for r in table])


def test_waterbirds(tmp_path: Path) -> None:
    make_waterbirds(tmp_path)
    rows = by_id(read_dataset(make_config("waterbirds", tmp_path)))

    summary = {k: (r["label"], r["class_name"], r["split"], r["group"], r["place"]) for k, r in rows.items()}
    assert summary == {
        "1": (1, "waterbird", "train", 3, 1),
        "2": (0, "landbird", "train", 1, 1),
        "3": (0, "landbird", "val", 0, 0),
        "4": (1, "waterbird", "test", 2, 0),
    }
    assert rows["1"]["path"] == str(tmp_path / "001.Albatross" / "a.jpg")


def test_waterbirds_missing_column_names_file_and_column(tmp_path: Path) -> None:
    meta = make_waterbirds(tmp_path, ["img_id", "img_filename", "y", "split"])
    with pytest.raises(DatasetError, match=f"{re.escape(str(meta))}: missing column 'place'"):
        read_dataset(make_config("waterbirds", tmp_path))


def test_waterbirds_missing_metadata(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="metadata.csv"):
        read_dataset(make_config("waterbirds", tmp_path))


# ------------------------------------------------------------------------------------------------ celeba

CELEBA_ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Male"]
CELEBA_TABLE = [  # filename, 5_o_Clock_Shadow, Blond_Hair, Male, partition
    ("000001.jpg", -1, 1, -1, 0),
    ("000002.jpg", 1, -1, 1, 0),
    ("000003.jpg", -1, 1, 1, 1),
    ("000004.jpg", -1, -1, -1, 2),
]


def make_celeba_txt(root: Path) -> None:
    lines = [str(len(CELEBA_TABLE)), " ".join(CELEBA_ATTRS)]
    lines += [f"{r[0]} " + " ".join(f"{v:2d}" for v in r[1:4]) for r in CELEBA_TABLE]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{r[0]} {r[4]}\n" for r in CELEBA_TABLE))
    for record in CELEBA_TABLE:
        make_image(root / "img_align_celeba" / record[0])


def test_celeba_txt(tmp_path: Path) -> None:
    make_celeba_txt(tmp_path)
    rows = by_id(read_dataset(make_config("celeba", tmp_path, target_attr="Blond_Hair", spurious_attr="Male")))

    # label: the class folders' sorted order (Blond_Hair < not_Blond_Hair); dataset_label: the attribute's 0/1
    summary = {k: (r["label"], r["dataset_label"], r["class_name"], r["split"], r["group"], r["Male"])
               for k, r in rows.items()}
    assert summary == {
        "000001": (0, 1, "Blond_Hair", "train", 2, 0),
        "000002": (1, 0, "not_Blond_Hair", "train", 1, 1),
        "000003": (0, 1, "Blond_Hair", "val", 3, 1),
        "000004": (1, 0, "not_Blond_Hair", "test", 0, 0),
    }
    assert rows["000001"]["path"] == str(tmp_path / "img_align_celeba" / "000001.jpg")


def test_celeba_csv_with_images_in_root(tmp_path: Path) -> None:
    write_csv(tmp_path / "list_attr_celeba.csv", ["image_id", *CELEBA_ATTRS], [list(r[:4]) for r in CELEBA_TABLE])
    write_csv(tmp_path / "list_eval_partition.csv", ["image_id", "partition"], [[r[0], r[4]] for r in CELEBA_TABLE])
    for record in CELEBA_TABLE:
        make_image(tmp_path / record[0])
    rows = by_id(read_dataset(make_config("celeba", tmp_path, target_attr="Male", spurious_attr="Blond_Hair")))

    assert rows["000002"]["class_name"] == "Male" and rows["000002"]["label"] == 0 and rows["000002"]["dataset_label"] == 1
    assert rows["000002"]["group"] == 2 and rows["000002"]["Blond_Hair"] == 0
    assert rows["000004"]["class_name"] == "not_Male" and rows["000004"]["split"] == "test"
    assert rows["000003"]["path"] == str(tmp_path / "000003.jpg")


def test_celeba_unknown_attribute_names_file_and_attribute(tmp_path: Path) -> None:
    make_celeba_txt(tmp_path)
    with pytest.raises(DatasetError, match="list_attr_celeba.txt: attribute 'Smiling' is not in the header"):
        read_dataset(make_config("celeba", tmp_path, target_attr="Blond_Hair", spurious_attr="Smiling"))


def test_celeba_missing_partition_file(tmp_path: Path) -> None:
    make_celeba_txt(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match="list_eval_partition"):
        read_dataset(make_config("celeba", tmp_path))


# ------------------------------------------------------------------------------------------------ spuco


def test_spuco(tmp_path: Path) -> None:
    for name in ("train/cat/indoor/1.png", "train/cat/outdoor/2.png", "train/dog/outdoor/3.png",
                 "valid/dog/indoor/4.png", "test/cat/outdoor/5.png"):
        make_image(tmp_path / name)
    rows = by_id(read_dataset(make_config("spuco", tmp_path)))

    summary = {k: (r["label"], r["class_name"], r["split"], r["group"], r["spurious"]) for k, r in rows.items()}
    assert summary == {
        "train/cat/indoor/1": (0, "cat", "train", 0, "indoor"),
        "train/cat/outdoor/2": (0, "cat", "train", 1, "outdoor"),
        "train/dog/outdoor/3": (1, "dog", "train", 3, "outdoor"),
        "valid/dog/indoor/4": (1, "dog", "val", 2, "indoor"),
        "test/cat/outdoor/5": (0, "cat", "test", 1, "outdoor"),
    }


def test_spuco_without_split_folders(tmp_path: Path) -> None:
    make_image(tmp_path / "cat" / "indoor" / "1.png")
    with pytest.raises(DatasetError, match="no split folders"):
        read_dataset(make_config("spuco", tmp_path))
