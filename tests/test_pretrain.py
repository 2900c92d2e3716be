"""classifier.weights: synthetic-pretrain: a balanced corpus of shapes no benchmark uses, a cached backbone."""

import numpy as np
import torch

from aspire.classifier import build_model
from aspire.config import ClassifierConfig, PretrainConfig
from aspire.pretrain import PRETRAIN_SHAPES, backbone_store, draw_corpus
from aspire.synth import Shape


def test_pretraining_shapes_are_not_benchmark_shapes():
    assert not set(PRETRAIN_SHAPES) & set(Shape.__args__)


def test_corpus_is_balanced_and_reproducible(tmp_path):
    pretrain = PretrainConfig(classes=4, images_per_class=6)
    rows = draw_corpus(pretrain, 32, tmp_path / "a")
    train = [r for r in rows if r["split"] == "train"]
    assert [sum(r["label"] == k for r in train) for k in range(4)] == [6] * 4
    again = draw_corpus(pretrain, 32, tmp_path / "b")
    first = np.asarray(__import__("PIL.Image").Image.open(rows[3]["path"]))
    assert np.array_equal(first, np.asarray(__import__("PIL.Image").Image.open(again[3]["path"])))


def test_build_model_loads_the_committed_backbone_and_trains_it_once(tmp_path):
    config = ClassifierConfig(arch="small-cnn", weights="synthetic-pretrain", image_size=32, batch_size=16,
                              device="cpu", pretrain=PretrainConfig(classes=3, images_per_class=8, epochs=1,
                                                                    cache=str(tmp_path)))
    a = build_model(config, 2)
    store = backbone_store(config)
    marker = store.read_marker("backbone")
    assert marker is not None and not (store.part_dir("backbone") / "corpus").exists()
    b = build_model(config.model_copy(update={"seed": 5}), 4)  # another head, the same backbone, not retrained
    assert store.read_marker("backbone")["token"] == marker["token"]
    assert all(torch.equal(x, y) for x, y in zip(a.features.state_dict().values(), b.features.state_dict().values()))
    scratch = build_model(config.model_copy(update={"weights": None}), 2)
    assert not torch.equal(scratch.features[0].weight, a.features[0].weight)
    assert b.fc.out_features == 4
