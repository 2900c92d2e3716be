"""SLIM (aspire.robust.slim): Grad-CAM, query selection, label spreading, Eq. 3-6 allocation, annotation files,
and both trainer modes end to end on a tiny synthetic benchmark, on CPU."""

import csv

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from aspire.classifier import SmallCNN, save_model
from aspire.config import ClassifierConfig
from aspire.robust.base import predict_rows
from aspire.robust.erm import ERMTrainer
from aspire.robust.slim import (
    MissingAnswers,
    SLIMTrainer,
    allocate,
    attention_features,
    curate,
    gradcam,
    last_conv_block,
    read_answers,
    select_queries,
    simulated_answers,
    spread_labels,
    write_queries,
)
from tiny_models import draw_splits

CONFIG = ClassifierConfig(arch="small-cnn", image_size=32, epochs=1, lr=0.05, batch_size=32, device="cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread on the shared CPU


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """3 classes, 30 train images each; val: one image per class x background x object group (24)."""
    return draw_splits(tmp_path_factory.mktemp("synth"), image_size=32, train_per_class=30, val_per_group=1,
                       test_per_group=1)


@pytest.fixture(scope="module")
def reference(bench):
    return ERMTrainer().train(bench["train"], bench["val"], CONFIG, seed=0).model


class GapNet(nn.Module):
    """Conv layers, global average pooling and a linear head: Grad-CAM is then exactly CAM."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_gradcam_of_a_gap_linear_model_is_cam_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = GapNet().train()
    model.features[0].weight.requires_grad_(False)
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    maps, cams = gradcam(model, images, targets)
    with torch.no_grad():
        a = model.features[:4](images)  # (N, 5, 8, 8), the output of last_conv_block (the second ReLU)
        expected = torch.relu(torch.einsum("nc,nchw->nhw", model.fc.weight[targets], a))
    expected = expected / expected.flatten(1).max(1).values.view(-1, 1, 1)
    assert np.allclose(maps, a.numpy(), atol=1e-6)
    assert np.allclose(cams, expected.numpy(), atol=1e-5) and cams.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())
    assert not model.features[0].weight.requires_grad and model.fc.weight.requires_grad and model.training
    f_a, f_abar = attention_features(maps, cams)
    weights = cams[:, None]
    assert np.allclose(f_a, (maps * weights).sum((2, 3)) / weights.sum((2, 3)), atol=1e-6)
    assert np.allclose(f_abar, (maps * (1 - weights)).sum((2, 3)) / (1 - weights).sum((2, 3)), atol=1e-6)


def test_last_conv_block():
    small = SmallCNN(3)
    assert last_conv_block(small) is small.features[15]  # the 4th block's MaxPool2d, before AdaptiveAvgPool2d
    resnet = torchvision.models.resnet18(weights=None)
    assert last_conv_block(resnet) is resnet.layer4
    with pytest.raises(ValueError, match="model=Linear"):
        last_conv_block(nn.Linear(2, 2))


def test_label_spreading_separates_two_blobs_from_one_answer_each():
    rng = np.random.default_rng(0)
    space = np.concatenate([rng.normal(0, 0.5, (20, 2)), rng.normal(10, 0.5, (20, 2))])
    prob = spread_labels(space, {0: True, 20: False})
    assert (prob[:20] > 0.9).all() and (prob[20:] < 0.1).all()
    assert (spread_labels(space, {0: True, 5: True}) == 1.0).all()  # one answer value: no spreading
    far = np.concatenate([space, space[:10] + 100])  # a blob no answer reaches on the 7-NN graph: unknown, 0.5
    assert (spread_labels(far, {0: True, 20: False})[40:] == 0.5).all()
    with pytest.raises(ValueError, match="no answers"):
        spread_labels(space, {})


def test_allocate_follows_eq_3_to_6_with_caps_and_redistribution():
    # core 0: rows 0-3, core distances 1, 1, 3, 3 -> w_c0 = 2;  core 1: rows 4-9, all 1 -> w_c1 = 1
    # g(0,0) rows 0-1, env dist 1 -> w = 1;  g(0,1) rows 2-3, env dist 3 -> w = 3
    # g(1,0) rows 4-8, env dist 2 -> w = 2;  g(1,1) row 9,   env dist 1 -> w = 1
    core = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    core_dist = np.array([1, 1, 3, 3, 1, 1, 1, 1, 1, 1], dtype=float)
    env = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 1])
    env_dist = np.array([1, 1, 3, 3, 2, 2, 2, 2, 2, 1], dtype=float)
    # N = 6: n_c0 = 6 * 2/3 = 4, n_c1 = 6 * 1/3 = 2
    # n_00 = 4 * 1/4 = 1, n_01 = 4 * 3/4 = 3, n_10 = 2 * 2/3 = 1.33, n_11 = 2 * 1/3 = 0.67
    # largest remainder: 1, 3, 1, 1; g(0,1) has 2 rows: capped at 2, 1 row left over;
    # g(1,1) is full, so it goes to g(0,0) or g(1,0) by their shares 1/6 vs 1.33/6: 0.43 vs 0.57 -> g(1,0)
    counts = allocate(core, core_dist, env, env_dist, budget=6)
    assert counts == {(0, 0): 1, (0, 1): 2, (1, 0): 2, (1, 1): 1}
    assert allocate(core, core_dist, env, env_dist, budget=100) == {(0, 0): 2, (0, 1): 2, (1, 0): 5, (1, 1): 1}
    assert sum(allocate(core, core_dist, env, env_dist, budget=9).values()) == 9


def test_curate_screens_splits_over_classes_and_keeps_a_screened_out_class():
    labels = np.array([0] * 10 + [1] * 10)
    prob = np.array([0.9] * 5 + [0.1] * 5 + [0.2 + 0.01 * i for i in range(10)])  # class 1 all below 0.5
    rng = np.random.default_rng(0)
    f_a, f_abar = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    chosen, allocation = curate(prob, 0.5, f_a, f_abar, labels, budget=6, n_core=2, n_env=2, seed=0)
    assert len(chosen) == 6 and sum(allocation.values()) == 6
    assert set(chosen) - {0, 1, 2, 3, 4} == {17, 18, 19}  # 3 screened-in rows of class 0, class 1's 3 most likely
    assert {c for c, _, _ in allocation} == {0, 1}
    assert curate(prob, 0.5, f_a, f_abar, labels, 6, 2, 2, seed=0) == (chosen, allocation)
    # class 1 keeps one row above the threshold: topped up to its share of 3, not starved to 1
    prob[19] = 0.6
    chosen, _ = curate(prob, 0.5, f_a, f_abar, labels, budget=6, n_core=2, n_env=2, seed=0)
    assert sum(labels[chosen] == 1) == 3 and set(chosen) - {0, 1, 2, 3, 4} == {17, 18, 19}


def test_select_queries_takes_the_row_nearest_each_centre_per_class():
    offsets = np.array([[0, 0], [0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]])  # a blob centred on its first point
    centres = [(0, 0), (10, 0), (0, 10), (20, 20), (30, 20)]  # 3 blobs of class 0, 2 of class 1
    space = np.concatenate([offsets + c for c in centres])
    labels = np.array([0] * 15 + [1] * 10)
    assert select_queries(space, labels, n_queries=5, seed=0) == [0, 5, 10, 15, 20]
    assert len(select_queries(space, labels, n_queries=2, seed=0)) == 2  # one per class
    assert len(set(labels[select_queries(space, labels, n_queries=2, seed=0)])) == 2


def test_simulated_annotator_checks_the_hot_region_against_the_box():
    cam = np.zeros((2, 4, 4), dtype=np.float32)
    cam[:, 0, 0] = 1.0  # hot in the top-left cell (pixels 0-7 of a 32 px image)
    boxes = [[0, 0, 12, 12], [20, 20, 32, 32]]
    assert simulated_answers(cam, boxes, [(32, 32)] * 2) == [True, False]
    assert simulated_answers(cam, boxes, [(32, 32)] * 2, flip_rate=1.0) == [False, True]
    assert simulated_answers(cam[:1], [None], [(32, 32)]) == [False]


@pytest.fixture
def tiny_rows(tmp_path):
    rows = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((24, 24, 3), 60 * i, dtype=np.uint8)).save(path)
        rows.append({"image_id": f"img{i}", "path": str(path), "label": i % 2, "class_name": f"c{i % 2}"})
    return rows


def fill(path, answers, header="image_id,class,answer"):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    lines = [header] + [f"{image_id},{cls},{answer}" for (image_id, cls, _), answer in zip(rows, answers)]
    path.write_text("\n".join(lines) + "\n")


def test_write_queries_and_read_answers_round_trip(tiny_rows, tmp_path):
    path = write_queries(tmp_path / "q", tiny_rows, [2, 0], np.random.default_rng(0).random((3, 2, 2)), CONFIG)
    assert path.name == "annotations.csv" and (path.parent / "README.txt").is_file()
    assert Image.open(path.parent / "queries-001.png").size == (4 * 2 * 128, 128 + 14)  # 2 pairs, one grid row
    with pytest.raises(MissingAnswers, match="annotations.csv: 2 of 2 answers are missing.*img2, img0"):
        read_answers(path)
    fill(path, ["Yes", " no "])
    assert read_answers(path) == {"img2": "yes", "img0": "no"}
    fill(path, ["", "unsure"])
    with pytest.raises(MissingAnswers, match="1 of 2 answers are missing"):
        read_answers(path)
    fill(path, ["yes", "maybe"])
    with pytest.raises(ValueError, match="annotations.csv: row 2 .*'maybe'"):
        read_answers(path)
    fill(path, ["yes", "no"], header="id,label,ok")
    with pytest.raises(ValueError, match="annotations.csv: expected columns"):
        read_answers(path)
    path.write_text("image_id,class,answer\nimg0,c0,yes, really\n")
    with pytest.raises(ValueError, match="row 1 has more fields than the header"):
        read_answers(path)
    path.write_text("image_id,class,answer\nimg0,c0,yes\nimg0,c0,no\n")
    with pytest.raises(ValueError, match="row 2: image_id 'img0' appears twice"):
        read_answers(path)


def test_slim_tr_with_a_saved_reference_and_simulated_answers(bench, reference, tmp_path):
    save_model(reference, tmp_path / "ref.pt", CONFIG, ["a", "b", "c"])
    # A 1-epoch model's 2x2 cams miss every object (all answers "no"); flipping half mixes yes and no answers.
    trainer = SLIMTrainer(mode="train", reference_model_path=str(tmp_path / "ref.pt"), annotator="simulated",
                          n_queries=6, budget_fraction=0.2, n_core=2, n_env=2, flip_rate=0.5)
    result = trainer.train(bench["train"], bench["val"], CONFIG, seed=0)
    extras = result.extras
    assert extras["curated_size"] == len(extras["curated_ids"]) == 18  # 0.2 * 90
    assert set(extras["curated_ids"]) <= {row["image_id"] for row in bench["train"]}
    assert sum(a["n"] for a in extras["allocation"]) == 18 and {a["class"] for a in extras["allocation"]} == {0, 1, 2}
    assert extras["n_queries"] == 6 and extras["answers"]["yes"] + extras["answers"]["no"] == 6
    assert extras["mode"] == "train" and extras["selection"] == "average validation accuracy, no group labels"
    assert len(result.history) == 1 and result.best_epoch == 0
    assert len(predict_rows(result.model, bench["test"], CONFIG)) == len(bench["test"])


def test_slim_val_retrains_the_head_on_curated_val_rows(bench, reference):
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    result = SLIMTrainer(mode="val", reference_model=reference, annotator="simulated", n_queries=3,
                         budget_fraction=0.5, n_core=2, n_env=2).train(bench["train"], bench["val"], CONFIG, seed=0)
    assert result.extras["curated_size"] == 12 and result.extras["selection"] == "none: last-layer fit"
    assert set(result.extras["curated_ids"]) <= {row["image_id"] for row in bench["val"]}
    assert result.history == [] and result.best_epoch is None
    backbone, head = result.model
    features = {k: v for k, v in before.items() if not k.startswith("fc.")}
    assert all(torch.equal(features[k], v) for k, v in backbone.state_dict().items())
    assert head.out_features == 3 and not torch.equal(head.weight, reference.fc.weight)


def test_slim_random_control_draws_the_same_budget_per_class_without_queries(bench, reference):
    result = SLIMTrainer(mode="val", reference_model=reference, annotator="random",
                         budget_fraction=0.5).train(bench["train"], bench["val"], CONFIG, seed=0)
    ids = result.extras["curated_ids"]
    assert result.extras["curated_size"] == len(ids) == 12 and result.extras["budget"] == {"answers": 0}
    by_class = [sum(row["image_id"] in ids and row["label"] == k for row in bench["val"]) for k in range(3)]
    assert by_class == [4, 4, 4]
    again = SLIMTrainer(mode="val", reference_model=reference, annotator="random",
                        budget_fraction=0.5).train(bench["train"], bench["val"], CONFIG, seed=1)
    assert again.extras["curated_ids"] != ids  # another seed, another subset


def test_slim_with_a_person_writes_queries_then_reads_the_answers(bench, reference, tmp_path):
    path = tmp_path / "ask" / "annotations.csv"
    trainer = SLIMTrainer(mode="val", reference_model=reference, annotations=str(path), n_queries=6,
                          budget_fraction=0.5, n_core=2, n_env=2)
    with pytest.raises(MissingAnswers, match="no such file; wrote 6 queries"):
        trainer.train(bench["train"], bench["val"], CONFIG, seed=0)
    with open(path, newline="") as f:
        asked = [row["image_id"] for row in csv.DictReader(f)]
    fill(path, ["yes", "no", "unsure", "yes", "no", "yes"])
    result = trainer.train(bench["train"], bench["val"], CONFIG, seed=0)
    assert result.extras["query_ids"] == asked  # the same queries again: the answers fit the rerun
    assert result.extras["answers"] == {"yes": 3, "no": 2, "unsure": 1} and result.extras["curated_size"] == 12
    path.write_text(path.read_text() + "not-a-val-image,c0,yes\n")
    with pytest.raises(ValueError, match="annotations.csv: 1 image ids are not in the val rows.*not-a-val-image"):
        trainer.train(bench["train"], bench["val"], CONFIG, seed=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode='test'"):
        SLIMTrainer(mode="test", annotator="simulated")
    with pytest.raises(ValueError, match="annotations=None"):
        SLIMTrainer(annotator="file")
    with pytest.raises(ValueError, match="budget_fraction=0"):
        SLIMTrainer(annotator="simulated", budget_fraction=0)
