"""The export stage: the augmented set loads with Hugging Face datasets, torchvision and our reader;
Waterbirds-style metadata when the input was Waterbirds."""

import csv

import pytest
from PIL import Image

from aspire.config import DatasetConfig, GenerateConfig
from aspire.readers import read_dataset
from tasks.export import augmented_rows, run_export
from tasks.generate import images_per_class, plan_jobs


def dataset(tmp_path):
    rows = []
    for i, (split, label) in enumerate([("train", 0), ("train", 1), ("val", 0), ("test", 1), ("train", 0)]):
        path = tmp_path / "src" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        rows.append({"image_id": f"img{i}", "path": str(path), "label": label, "class_name": "ab"[label], "split": split,
                     "group": 2 * label + i % 2, "place": str(i % 2), "place_filename": f"p{i}.jpg", "source": "original",
                     "pred": label, "holdout": False})
    generated = tmp_path / "gen.png"
    Image.new("RGB", (8, 8), "blue").save(generated)
    made = [{"image_id": "gen::b::0", "path": str(generated), "label": 1, "class_name": "b", "split": "train",
             "seed": 7, "generator": "composite", "spurious_avoided": [["snow"]], "group": None}]
    return rows, made


def test_export_loads_in_datasets_torchvision_and_our_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows, made = dataset(tmp_path)
    exported, counts = run_export(augmented_rows(rows, made), tmp_path / "out", waterbirds=False)
    assert counts["rows"] == 6 and counts["generated"] == 1
    assert all("pred" not in r and "holdout" not in r for r in exported)

    import datasets
    import torchvision

    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out"))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 4, "validation": 1, "test": 1}
    assert sorted(loaded["train"]["source"]) == ["generated", "original", "original", "original"]
    assert torchvision.datasets.ImageFolder(str(tmp_path / "out" / "train")).classes == ["a", "b"]
    back = {r["image_id"]: r for r in read_dataset(DatasetConfig(format="hf-imagefolder", root=tmp_path / "out"))}
    assert back["gen::b::0"]["generator"] == "composite" and back["gen::b::0"]["spurious_avoided"] == '[["snow"]]'


def test_waterbirds_metadata_for_waterbirds_input(tmp_path):
    rows, made = dataset(tmp_path)
    run_export(augmented_rows(rows, made), tmp_path / "out", waterbirds=True)
    with open(tmp_path / "out" / "metadata.csv") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    generated = [r for r in records if r["place_filename"] == "generated"]
    assert len(generated) == 1 and generated[0]["y"] == "1" and generated[0]["split"] == "0"
    assert all((tmp_path / "out" / r["img_filename"]).is_file() for r in records)


@pytest.mark.parametrize("per_class, expected", [(None, {"a": 1, "b": 1}), (2.0, {"a": 4, "b": 2})])
def test_images_per_class_rule(tmp_path, per_class, expected):
    rows, _ = dataset(tmp_path)  # train: a in groups 0 and 0... see dataset(): a -> groups 0, 0; b -> group 3
    rows[4]["group"] = 1  # class a: groups {0: 1, 1: 1} -> minority 1; class b: one group -> 0 minority...
    counts = images_per_class(rows, GenerateConfig(per_class=per_class))
    if per_class is None:
        assert counts == {"a": 1, "b": 0}
    else:
        assert counts == expected
    jobs = plan_jobs({"a": 2}, {"a": 0}, seed=3)
    assert [j["image_id"] for j in jobs] == ["gen::a::0", "gen::a::1"] and jobs[0]["seed"] != jobs[1]["seed"]
    assert plan_jobs({"a": 2}, {"a": 0}, seed=3) == jobs
