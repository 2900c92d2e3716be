"""The classifier E of ASPIRE: build, train with ERM, predict in batches, save and load.

ASPIRE step 1 (https://arxiv.org/abs/2308.10103, Sec. 2(1) and Sec. 3): an ERM model trained with SGD
(lr 1e-3, weight decay 1e-4) whose correctly classified training images form the hold-out set. The same
:func:`predict_images` re-classifies edited images in the later stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from aspire.config import ClassifierConfig
from aspire.images import load_rgb
from aspire.manifest import Row

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
            if config.weights is not None:
                raise ValueError("classifier.weights must be null for arch 'small-cnn' (it has no pretrained weights)")
            return SmallCNN(num_classes)
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


class RowDataset(Dataset):
    """Manifest rows as (image tensor, label) pairs."""

    def __init__(self, rows: Sequence[Row], image_size: int) -> None:
        self.rows, self.image_size = list(rows), image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.rows[i]
        return to_tensor(load_rgb(row["path"]), self.image_size), row["label"]


def train_erm(
    model: nn.Module,
    rows: Sequence[Row],
    config: ClassifierConfig,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with ERM (cross-entropy, SGD with momentum), seeded by ``config.seed``.

    Args:
        model: the classifier, e.g. from :func:`build_model`.
        rows: training rows (``path``, ``label``).
        config: optimiser settings.
        checkpoint: if given, saved after every epoch and resumed from when present (a killed run goes on
            from its last finished epoch).
        on_epoch: called with (epoch, mean loss) after each epoch.

    Returns:
        History: one ``{"epoch", "loss", "train_acc"}`` per epoch (resumed epochs included).
    """
    device = resolve_device(config.device)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"] + 1
        log.info("resuming ERM training from epoch %d (%s)", start, checkpoint)
    loader_seed = torch.Generator().manual_seed(config.seed)
    for epoch in range(start, config.epochs):
        loader_seed.manual_seed(config.seed * 100003 + epoch)  # same order per epoch whether resumed or not
        loader = DataLoader(RowDataset(rows, config.image_size), batch_size=config.batch_size, shuffle=True,
                            num_workers=config.num_workers, generator=loader_seed)
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in tqdm(loader, desc=f"ERM epoch {epoch + 1}/{config.epochs}", leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        history.append({"epoch": epoch, "loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)})
        log.info("ERM epoch %d/%d loss %.4f train acc %.3f", epoch + 1, config.epochs, history[-1]["loss"], history[-1]["train_acc"])
        if on_epoch is not None:
            on_epoch(epoch, history[-1]["loss"])
        if checkpoint is not None:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history, "epoch": epoch}, tmp)
            tmp.replace(checkpoint)
    return history


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
    torch.save({"state_dict": model.state_dict(), "config": config.model_dump(mode="json"), "class_names": class_names}, path)


def load_model(path: Path) -> tuple[nn.Module, ClassifierConfig, list[str]]:
    """Inverse of :func:`save_model`; the model is rebuilt without fetching pretrained weights."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    config = ClassifierConfig.model_validate({**saved["config"], "weights": None})
    model = build_model(config, len(saved["class_names"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, ClassifierConfig.model_validate(saved["config"]), saved["class_names"]
