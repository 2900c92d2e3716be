"""Classifier building/training/prediction (aspire.classifier, tasks.classifier) and the holdout selection."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aspire.cache import file_digest
from aspire.classifier import build_model, fit, load_model, predict_images
from aspire.config import ClassifierConfig, HoldoutConfig
from tasks.classifier import load_classifier, run_predict, train_classifier
from tasks.holdout import evaluate, select_holdout

CPU = dict(device="cpu", image_size=16, batch_size=8)


def colour_rows(tmp_path: Path, n_per_class: int = 12) -> list[dict]:
    """Class 0: reddish squares, class 1: bluish squares (trivially separable)."""
    rng = np.random.default_rng(0)
    rows = []
    for label, base in enumerate([(200, 30, 30), (30, 30, 200)]):
        for i in range(n_per_class):
            pixels = np.clip(np.array(base) + rng.integers(-25, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = tmp_path / f"{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            split = "train" if i < n_per_class - 4 else "test"
            rows.append({"image_id": f"{label}_{i}", "path": str(path), "label": label,
                         "class_name": ["red", "blue"][label], "split": split, "group": label})
    return rows


def test_build_model_small_cnn_and_torchvision_heads():
    assert build_model(ClassifierConfig(arch="small-cnn"), 3)(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    resnet = build_model(ClassifierConfig(arch="resnet18"), 5)
    assert resnet.fc.out_features == 5
    assert build_model(ClassifierConfig(arch="mobilenet_v3_small"), 4)(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


def test_build_model_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="classifier.arch='resnet9000'"):
        build_model(ClassifierConfig(arch="resnet9000"), 2)
    with pytest.raises(ValueError, match="classifier.weights=.*no such file"):
        build_model(ClassifierConfig(arch="resnet18", weights=str(tmp_path / "missing.pt")), 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model(ClassifierConfig(arch="small-cnn"), 1)


def test_backbone_weights_load_from_a_local_path(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    model = build_model(ClassifierConfig(arch="resnet18", weights=str(tmp_path / "resnet18.pt")), 2)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 2


def test_erm_learns_and_is_seeded(tmp_path):
    rows = colour_rows(tmp_path)
    train = [r for r in rows if r["split"] == "train"]
    config = ClassifierConfig(arch="small-cnn", epochs=4, lr=0.05, **CPU)
    a, b = build_model(config, 2), build_model(config, 2)
    history_a, _ = fit(a, train, [], config, config.seed)
    fit(b, train, [], config, config.seed)
    assert history_a[-1]["train_acc"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    preds, confs = predict_images(a, [Image.open(r["path"]) for r in rows], 16, batch_size=5, device="cpu")
    assert preds == [r["label"] for r in rows] and all(0.5 <= c <= 1 for c in confs)


def test_crop_flip_augmentation_is_seeded_changes_training_and_the_key(tmp_path):
    """classifier.augment=crop-flip (the Corner Cases recipe): random crops and flips of the training images only,
    the same for the same seed; the key of a model trained without it is the one it had before the option."""
    from aspire.classifier import IndexedRows, train_augmentation
    from aspire.config import ConfigError, load_config
    from tasks.classifier import key_config

    rows = [r for r in colour_rows(tmp_path) if r["split"] == "train"]
    plain = ClassifierConfig(arch="small-cnn", epochs=2, lr=0.05, **CPU)
    cropped = plain.model_copy(update={"augment": "crop-flip", "crop_scale": (0.2, 0.5), "crop_ratio": (0.75, 1.33)})
    assert train_augmentation(plain) is None
    torch.manual_seed(0)
    crops = [IndexedRows(rows, 16, train_augmentation(cropped))[0][0] for _ in range(4)]
    assert crops[0].shape == (3, 16, 16) and not all(torch.equal(crops[0], c) for c in crops[1:])
    weights = []
    for config in (plain, cropped, cropped):
        model = build_model(config, 2)
        fit(model, rows, [], config, 0)
        weights.append(torch.cat([p.flatten() for p in model.state_dict().values()]))
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[0], weights[1])
    assert "augment" not in key_config(plain) and "crop_scale" not in key_config(plain)
    assert key_config(cropped)["augment"] == "crop-flip"
    path = tmp_path / "run.yaml"
    path.write_text("workdir: w\ndataset: {format: imagefolder, root: d}\nclassifier: {crop_scale: [0.5, 1.2]}\n")
    with pytest.raises(ConfigError, match=r"crop_scale=\[0.5, 1.2\]: need 0 < low <= high <= 1"):
        load_config(path)


def test_training_resumes_from_checkpoint_identically(tmp_path):
    rows = [r for r in colour_rows(tmp_path) if r["split"] == "train"]
    straight = ClassifierConfig(arch="small-cnn", epochs=3, lr=0.05, **CPU)
    model = build_model(straight, 2)
    fit(model, rows, [], straight, 0)
    checkpoint = tmp_path / "ckpt.pt"
    first = build_model(straight, 2)
    fit(first, rows, [], straight.model_copy(update={"epochs": 2}), 0, checkpoint=checkpoint)  # "killed" after 2
    resumed = build_model(straight, 2)
    history, _ = fit(resumed, rows, [], straight, 0, checkpoint=checkpoint)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for p, q in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6)


def test_train_predict_and_select_holdout(tmp_path):
    rows = colour_rows(tmp_path)
    config = ClassifierConfig(arch="small-cnn", epochs=4, lr=0.05, **CPU)
    out = tmp_path / "model"
    out.mkdir()
    info = train_classifier(rows, config, out, tmp_path / "ckpt.pt")
    assert info["classes"] == ["red", "blue"]
    model, saved_config, names = load_model(out / "model.pt")
    assert saved_config == config and names == ["red", "blue"]

    missing = {**rows[0], "image_id": "gone", "path": str(tmp_path / "gone.png")}
    model_digest = file_digest(out / "model.pt")
    result = run_predict(rows + [missing], out / "model.pt", model_digest)
    assert load_classifier(out / "model.pt", model_digest) is load_classifier(out / "model.pt", model_digest)
    assert load_classifier(out / "model.pt", "retrained") is not load_classifier(out / "model.pt", model_digest)
    assert [q["image_id"] for q in result.quarantine] == ["gone"] and "missing" in result.quarantine[0]["reason"]
    assert all(r["correct"] == (r["pred"] == r["label"]) for r in result.rows)

    selected = select_holdout(result.rows, HoldoutConfig(fraction=0.25, seed=1))
    held = [r for r in selected if r["holdout"]]
    correct_train = [r for r in selected if r["split"] == "train" and r["correct"]]
    assert len(held) == round(0.25 * len(correct_train))
    assert all(r["split"] == "train" and r["correct"] for r in held)
    reordered = select_holdout(list(reversed(result.rows)), HoldoutConfig(fraction=0.25, seed=1))
    assert {r["image_id"] for r in reordered if r["holdout"]} == {r["image_id"] for r in held}
    other_seed = select_holdout(result.rows, HoldoutConfig(fraction=0.25, seed=2))
    assert {r["image_id"] for r in other_seed if r["holdout"]} != {r["image_id"] for r in held}
    assert evaluate(selected)["test"]["avg_acc"] == 1.0


def test_a_full_disk_while_saving_a_model_is_an_oserror(tmp_path):
    """Given a path, torch.save reports a full disk as RuntimeError('unexpected pos ...'); the project's writers
    raise OSError(ENOSPC), which the CLI turns into its one-line 'disk is full' message (/dev/full: always full)."""
    import errno

    from aspire.classifier import save_torch

    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(RuntimeError):
        torch.save({"weights": torch.zeros(100_000)}, full)
    with pytest.raises(OSError) as caught:
        save_torch({"weights": torch.zeros(100_000)}, full)
    assert caught.value.errno == errno.ENOSPC
