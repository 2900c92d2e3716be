"""The classifier E of ASPIRE: build, train with ERM, predict in batches, save and load.

ASPIRE step 1 (https://arxiv.org/abs/2308.10103, Sec. 2(1) and Sec. 3): an ERM model trained with SGD
(lr 1e-3, weight decay 1e-4) whose correctly classified training images form the hold-out set. The same
:func:`predict_images` re-classifies edited images in the later stages.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from aspire.config import ClassifierConfig
from aspire.images import load_rgb
from aspire.lazy import resolve_device
from aspire.manifest import Row
from aspire.metrics import group_accuracy, selection_key

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head: a random-init classifier small enough for the CPU demo."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        blocks, channels = [], 3
        for out in (width, width * 2, width * 4, width * 4):
            blocks += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 4w)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W) normalised
        return self.fc(self.features(x))


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last linear layer of a torchvision classifier for one with ``num_classes`` outputs."""
    for owner_name in ("fc", "head", "heads", "classifier"):
        owner = getattr(model, owner_name, None)
        if isinstance(owner, nn.Linear):
            setattr(model, owner_name, nn.Linear(owner.in_features, num_classes))
            return model
        if isinstance(owner, nn.Sequential):
            for i in reversed(range(len(owner))):
                if isinstance(owner[i], nn.Linear):
                    owner[i] = nn.Linear(owner[i].in_features, num_classes)
                    return model
    raise ValueError(f"classifier.arch={type(model).__name__}: found no final linear layer to replace")


def build_model(config: ClassifierConfig, num_classes: int) -> nn.Module:
    """A classifier with ``num_classes`` outputs.

    Raises:
        ValueError: unknown ``classifier.arch``, or weights that cannot be loaded (named in the message).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: need at least 2 classes to train a classifier")
    with torch.random.fork_rng():  # weight init is seeded; the caller's random state is left as it was
        torch.manual_seed(config.seed)
        if config.arch == "small-cnn":
            model = SmallCNN(num_classes)
            if config.weights == "synthetic-pretrain":
                from aspire.pretrain import pretrained_backbone

                model.features.load_state_dict(pretrained_backbone(config))
            elif config.weights is not None:
                raise ValueError(f"classifier.weights={config.weights!r}: arch 'small-cnn' takes null (random init) "
                                 "or 'synthetic-pretrain'")
            return model
        if config.arch not in torchvision.models.list_models():
            raise ValueError(f"classifier.arch={config.arch!r}: not 'small-cnn' nor a torchvision.models name")
        model = _load_backbone(config)
        return _replace_head(model, num_classes)


def _load_backbone(config: ClassifierConfig) -> nn.Module:
    if config.weights is None:
        return torchvision.models.get_model(config.arch, weights=None)
    if config.weights == "imagenet":
        try:
            return torchvision.models.get_model(config.arch, weights="DEFAULT")
        except Exception as exc:  # offline, no cache: say what to do instead
            raise ValueError(
                f"classifier.weights='imagenet': could not get {config.arch} ImageNet weights ({exc}). "
                "Download them once, or give classifier.weights a local state_dict path."
            ) from exc
    path = Path(config.weights)
    if not path.is_file():
        raise ValueError(f"classifier.weights={config.weights!r}: no such file")
    model = torchvision.models.get_model(config.arch, weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    log.info("loaded %s weights from %s (missing %d, unexpected %d keys)", config.arch, path, len(missing), len(unexpected))
    return model


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> normalised (3, size, size) float32 tensor."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


@torch.no_grad()
def predict_images(model: nn.Module, images: Sequence[Image.Image], image_size: int, batch_size: int = 64,
                   device: str = "auto") -> tuple[list[int], list[float]]:
    """Batched, no-grad prediction: (predicted labels, softmax confidence of the prediction)."""
    dev = resolve_device(device)
    model.to(dev).eval()
    preds: list[int] = []
    confidences: list[float] = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([to_tensor(im, image_size) for im in images[i : i + batch_size]]).to(dev)
        probs = model(batch).softmax(dim=1)
        conf, pred = probs.max(dim=1)
        preds += pred.tolist()
        confidences += conf.tolist()
    return preds, confidences


def save_model(model: nn.Module, path: Path, config: ClassifierConfig, class_names: list[str]) -> None:
    """Save weights plus what is needed to rebuild the model (config and class names)."""
    save_torch({"state_dict": model.state_dict(), "config": config.model_dump(mode="json"), "class_names": class_names}, path)


def save_torch(value: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk raises ``OSError(ENOSPC)`` (given a path, torch's writer
    reports it as a ``RuntimeError`` "unexpected pos ...", which reads like a bug)."""
    with open(path, "wb") as f:
        torch.save(value, f)


def load_model(path: Path) -> tuple[nn.Module, ClassifierConfig, list[str]]:
    """Inverse of :func:`save_model`; the model is rebuilt without fetching pretrained weights."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    config = ClassifierConfig.model_validate({**saved["config"], "weights": None})
    model = build_model(config, len(saved["class_names"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, ClassifierConfig.model_validate(saved["config"]), saved["class_names"]


# -- training -------------------------------------------------------------------------------------------

# loss_fn(logits (B, K), labels (B,), row indices (B,)) -> scalar loss; the indices let a method look up groups.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class IndexedRows(Dataset):
    """Manifest rows as (image tensor (3, S, S), label, row index); ``augment`` (a PIL -> PIL transform, see
    :func:`train_augmentation`) is applied before the resize and normalisation."""

    def __init__(self, rows: Sequence[Row], image_size: int, augment: Callable[[Image.Image], Image.Image] | None = None) -> None:
        self.rows, self.image_size, self.augment = list(rows), image_size, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        row = self.rows[i]
        image = load_rgb(row["path"])
        if self.augment is not None:
            image = self.augment(image)
        return to_tensor(image, self.image_size), row["label"], i


def train_augmentation(config: ClassifierConfig) -> Callable[[Image.Image], Image.Image] | None:
    """The training-time transform of ``classifier.augment``: None, or crop-flip (torchvision's RandomResizedCrop
    to image_size with ``crop_scale`` / ``crop_ratio``, then RandomHorizontalFlip). Its randomness comes from
    torch's RNG, which :func:`fit` seeds, so a seed gives the same crops."""
    if config.augment == "none":
        return None
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(config.image_size, scale=tuple(config.crop_scale), ratio=tuple(config.crop_ratio)),
        transforms.RandomHorizontalFlip(),
    ])


def predict_rows(model: nn.Module, rows: Sequence[Row], config: ClassifierConfig, chunk: int = 512) -> list[int]:
    """Predicted labels of ``rows`` (in order), by :func:`predict_images`; images are loaded chunk by chunk."""
    preds: list[int] = []
    for start in range(0, len(rows), chunk):
        images = [load_rgb(row["path"]) for row in rows[start : start + chunk]]
        preds += predict_images(model, images, config.image_size, config.batch_size, config.device)[0]
    return preds


def evaluate(model: nn.Module, rows: Sequence[Row], config: ClassifierConfig) -> dict:
    """:func:`~aspire.metrics.group_accuracy` (average, per-group, worst-group) of the model on ``rows``."""
    preds = predict_rows(model, rows, config)
    return group_accuracy({**row, "pred": pred} for row, pred in zip(rows, preds))


def _val_text(record: dict[str, Any]) -> str:
    if record["val_avg_acc"] is None:
        return ""
    text = f", val average {record['val_avg_acc']:.3f}"
    if record["val_worst_group_acc"] is not None:
        text += f", worst group {record['val_worst_group_acc']:.3f} ({record['val_worst_group']})"
    return text


def fit(model: nn.Module, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int,
        loss_fn: LossFn | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        sample_weights: Sequence[float] | None = None, checkpoint: Path | None = None) -> tuple[list[dict], int]:
    """Train ``model`` in place for ``config.epochs`` epochs (SGD with momentum) and load the best epoch's weights:
    the one training loop of the project (the classifier stage's ERM model and every robust trainer).

    Data order per epoch comes from a ``torch.Generator`` seeded by (seed, epoch); the global RNG (dropout in
    torchvision models, ``classifier.augment``'s crops and flips) is forked and seeded, so the caller's random state is untouched. With ``sample_weights``
    (one per train row) an epoch draws ``len(train_rows)`` rows with replacement in proportion to them, instead
    of shuffling. With ``checkpoint``, the state (weights, optimiser, RNG, history, best epoch) is saved after
    every epoch and resumed from when present, so a killed run goes on from its last finished epoch and ends
    with the same weights.

    Returns:
        (history, best_epoch).
    """
    if sample_weights is not None and len(sample_weights) != len(train_rows):
        raise ValueError(f"sample_weights: {len(sample_weights)} weights for {len(train_rows)} train rows")
    device = resolve_device(config.device)
    model.to(device)
    loss_fn = loss_fn or (lambda logits, labels, index: nn.functional.cross_entropy(logits, labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    by_group = bool(val_rows) and all(row.get("group") is not None for row in val_rows)
    augment = train_augmentation(config)
    history: list[dict[str, Any]] = []
    best_epoch, best_state, start = None, None, 0
    generator = torch.Generator()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if checkpoint is not None and checkpoint.is_file():
            state = torch.load(checkpoint, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            history, best_epoch, best_state = state["history"], state["best_epoch"], state["best_state"]
            start = len(history)
            log.info("resuming training from epoch %d (%s)", start + 1, checkpoint)
        for epoch in range(start, config.epochs):
            generator.manual_seed(seed * 100003 + epoch)
            sampler = None if sample_weights is None else WeightedRandomSampler(
                sample_weights, len(train_rows), replacement=True, generator=generator)
            loader = DataLoader(IndexedRows(train_rows, config.image_size, augment), batch_size=config.batch_size,
                                shuffle=sampler is None, sampler=sampler, num_workers=config.num_workers,
                                generator=generator)
            model.train()
            total, correct, seen = 0.0, 0, 0
            # A progress bar beside the loop, not around it: tqdm(loader) changes the loader's shuffle order.
            # Closed however the epoch ends: an interrupted run's last lines are not written over a stale bar.
            with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None) as bar:
                for images, labels, index in loader:
                    bar.update(1)
                    images, labels = images.to(device), labels.to(device)
                    logits = model(images)  # (B, K)
                    loss = loss_fn(logits, labels, index)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(labels)
                    correct += (logits.argmax(1) == labels).sum().item()
                    seen += len(labels)
            val = evaluate(model, val_rows, config) if val_rows else {}
            record = {"epoch": epoch, "loss": total / seen, "train_acc": correct / seen, "val_avg_acc": val.get("avg_acc"),
                      "val_worst_group_acc": val.get("worst_group_acc"), "val_worst_group": val.get("worst_group")}
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            log.info("epoch %d/%d: loss %.4f, train accuracy %.3f%s", epoch + 1, config.epochs, record["loss"],
                     record["train_acc"], _val_text(record))
            better = best_epoch is None or selection_key(record, by_group) > selection_key(history[best_epoch], by_group)
            if not val_rows or better:  # no val rows: keep the last epoch
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
            if checkpoint is not None:
                tmp = checkpoint.with_suffix(".tmp")
                save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                            "history": history, "best_epoch": best_epoch, "best_state": best_state}, tmp)
                tmp.replace(checkpoint)
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch
