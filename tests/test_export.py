"""The export stage: the augmented set loads with Hugging Face datasets, torchvision and our reader;
Waterbirds-style metadata when the input was Waterbirds."""

import csv
from pathlib import Path

import pytest
from PIL import Image

from aspire.config import DatasetConfig, GenerateConfig
from aspire.imagefolder import write_imagefolder
from aspire.readers import DatasetError, labels_in_folder_order, read_dataset
from tasks.export import augmented_rows, run_export, with_generated_groups
from tasks.generate import images_per_class, plan_jobs


def dataset(tmp_path, names=("dog", "bird", "car")):
    """Rows of three classes whose reader labels follow the names' given order (dog=0, bird=1, car=2, as a
    synthetic benchmark's spec has them), renumbered as read_dataset does, plus generated rows of both
    generators (the textual-inversion one with its token)."""
    rows = []
    for i, (split, label) in enumerate([("train", 0), ("train", 1), ("val", 0), ("test", 1), ("train", 0), ("train", 2),
                                        ("val", 2), ("test", 2), ("val", 1), ("test", 0)]):
        path = tmp_path / "src" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 25, 0, 0)).save(path)
        rows.append({"image_id": f"img{i}", "path": str(path), "label": label, "class_name": names[label],
                     "split": split, "group": 2 * label + i % 2, "place": str(i % 2), "place_filename": f"p{i}.jpg",
                     "source": "synthetic", "objects": ["ball"] if i % 2 else [], "pred": label, "holdout": False})
    rows = labels_in_folder_order(rows)
    label = {r["class_name"]: r["label"] for r in rows}
    generated = tmp_path / "gen.png"
    Image.new("RGB", (8, 8), "blue").save(generated)
    made = [{"image_id": "gen::bird::0", "path": str(generated), "label": label["bird"], "class_name": "bird",
             "split": "train", "seed": 7, "generator": "composite", "spurious_avoided": [["snow"]], "group": None},
            {"image_id": "gen::car::0", "path": str(generated), "label": label["car"], "class_name": "car",
             "split": "train", "seed": 8, "generator": "textual-inversion", "token": "<car>",
             "spurious_avoided": [["road", "street"]], "group": None}]
    return rows, made


def test_labels_follow_the_class_folders_sorted_order():
    rows = [{"image_id": str(i), "label": label, "class_name": name} for i, (label, name) in
            enumerate([(0, "dog"), (1, "bird"), (2, "car"), (0, "dog")])]
    renumbered = labels_in_folder_order(rows)
    assert [(r["class_name"], r["label"], r["dataset_label"]) for r in renumbered] == [
        ("dog", 2, 0), ("bird", 0, 1), ("car", 1, 2), ("dog", 2, 0)]
    assert labels_in_folder_order(renumbered[:3]) is not None
    already = [{"image_id": "a", "label": 0, "class_name": "landbird"}, {"image_id": "b", "label": 1, "class_name": "waterbird"}]
    assert labels_in_folder_order(already) is already
    with pytest.raises(DatasetError, match="named both"):
        labels_in_folder_order([*rows, {"image_id": "x", "label": 0, "class_name": "cat"}])
    with pytest.raises(ValueError, match="sorted order of the class folders"):
        write_imagefolder([{"image_id": "a", "path": "/nonexistent", "label": 0, "class_name": "dog", "split": "train"},
                           {"image_id": "b", "path": "/nonexistent", "label": 1, "class_name": "bird", "split": "train"}],
                          Path("/tmp/never-written"))


def test_export_loads_in_datasets_torchvision_and_our_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows, made = dataset(tmp_path)
    exported, counts = run_export(augmented_rows(rows, made), tmp_path / "out", waterbirds=False)
    assert counts["rows"] == 12 and counts["generated"] == 2
    assert all("pred" not in r and "holdout" not in r for r in exported)

    import datasets
    import torchvision

    for loaded in (datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out")),
                   datasets.load_dataset(str(tmp_path / "out"))):
        assert {k: len(v) for k, v in loaded.items()} == {"train": 6, "validation": 3, "test": 3}
        features = loaded["train"].features
        assert features == loaded["validation"].features == loaded["test"].features
        assert features["label"] == datasets.ClassLabel(names=["bird", "car", "dog"])
        assert features["group"] == datasets.Value("int64") and features["seed"] == datasets.Value("int64")
        assert features["spurious_avoided"] == datasets.List(datasets.List(datasets.Value("string")))
        assert features["objects"] == datasets.List(datasets.Value("string"))
        train = loaded["train"]
        assert sorted(train["source"]) == ["generated", "generated", "original", "original", "original", "original"]
        assert set(train["dataset_source"]) == {"synthetic", None}
        by_id = {r["image_id"]: r for r in train}
        assert by_id["gen::car::0"]["token"] == "<car>" and by_id["img0"]["token"] is None
        assert by_id["gen::car::0"]["spurious_avoided"] == [["road", "street"]]
        groups = {r["image_id"]: r["group"] for split in loaded.values() for r in split}
        assert groups["gen::bird::0"] != groups["gen::car::0"] and min(groups.values()) >= 0
        assert groups["gen::bird::0"] > max(r["group"] for r in rows)
        for split in loaded.values():  # each image's class index equals its folder's index in torchvision
            for record in split:
                assert features["label"].int2str(record["label"]) == Path(record["image"].filename).parent.name

    for split in ("train", "val", "test"):
        folder = torchvision.datasets.ImageFolder(str(tmp_path / "out" / split))
        assert folder.classes == ["bird", "car", "dog"]
        by_file = {Path(r["path"]).name: r["label"] for r in exported if r["split"] == split}
        assert [t for _, t in folder.samples] == [by_file[Path(p).name] for p, _ in folder.samples]

    back = {r["image_id"]: r for r in read_dataset(DatasetConfig(format="hf-imagefolder", root=tmp_path / "out"))}
    assert back["gen::bird::0"]["generator"] == "composite" and back["gen::bird::0"]["spurious_avoided"] == [["snow"]]
    assert {r["image_id"]: r["label"] for r in back.values()} == {r["image_id"]: r["label"] for r in exported}
    assert {r["image_id"]: r["group"] for r in with_generated_groups(list(back.values()))} == \
        {r["image_id"]: r["group"] for r in exported}  # groups survive a second numbering


def two_classes(tmp_path):
    """Two classes a and b (Waterbirds-shaped labels), one generated row."""
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


def test_waterbirds_metadata_for_waterbirds_input(tmp_path):
    rows, made = two_classes(tmp_path)
    run_export(augmented_rows(rows, made), tmp_path / "out", waterbirds=True)
    with open(tmp_path / "out" / "metadata.csv") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    generated = [r for r in records if r["place_filename"] == "generated"]
    assert len(generated) == 1 and generated[0]["y"] == "1" and generated[0]["split"] == "0"
    assert all((tmp_path / "out" / r["img_filename"]).is_file() for r in records)


@pytest.mark.parametrize("per_class, expected", [(None, {"a": 0, "b": 0}), (2.0, {"a": 4, "b": 2})])
def test_images_per_class_rule(tmp_path, per_class, expected):
    rows, _ = two_classes(tmp_path)  # train: a in groups 0 and 0... see dataset(): a -> groups 0, 0; b -> group 3
    rows[4]["group"] = 1  # class a: groups {0: 1, 1: 1}, equal: no minority; class b: one group: none either
    counts = images_per_class(rows, GenerateConfig(per_class=per_class))
    if per_class is None:
        assert counts == {"a": 0, "b": 0}
    else:
        assert counts == expected
    jobs = plan_jobs({"a": 2}, {"a": 0}, seed=3)
    assert [j["image_id"] for j in jobs] == ["gen::a::0", "gen::a::1"] and jobs[0]["seed"] != jobs[1]["seed"]
    assert plan_jobs({"a": 2}, {"a": 0}, seed=3) == jobs


@pytest.mark.parametrize("dataset, groups, expected", [
    # training group sizes from the papers: (class, group) -> images; ASPIRE Table 3 gives the minority totals
    ("waterbirds", {("landbird", 0): 3498, ("landbird", 1): 184, ("waterbird", 2): 56, ("waterbird", 3): 1057},
     {"landbird": 184, "waterbird": 56}),
    ("celeba", {("not_Blond_Hair", 0): 71629, ("not_Blond_Hair", 1): 66874, ("Blond_Hair", 2): 22880,
                ("Blond_Hair", 3): 1387}, {"not_Blond_Hair": 0, "Blond_Hair": 1387}),
    ("spuco-dogs", {("big", 0): 8500, ("big", 1): 500, ("small", 2): 500, ("small", 3): 8500}, {"big": 500, "small": 500}),
])
def test_generation_count_is_one_times_the_minority_groups(dataset, groups, expected):
    from tasks.generate import minority_images

    by_class = {}
    for (name, group), n in groups.items():
        by_class.setdefault(name, {})[group] = n
    assert {name: minority_images(sizes) for name, sizes in by_class.items()} == expected
    if dataset == "celeba":  # the old rule (class total minus its largest group) gave ~49x the paper's count
        assert sum(expected.values()) == 1387


def test_images_per_class_counts_rows_the_same_way(tmp_path):
    rows = [{"split": "train", "class_name": "a", "group": g, "image_id": f"{g}-{i}"}
            for g, n in ((0, 40), (1, 3), (2, 30)) for i in range(n)]  # group 2 is no minority (30 of 40)
    assert images_per_class(rows, GenerateConfig()) == {"a": 3}
