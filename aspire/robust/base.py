"""The one interface of the robust trainers, the shared epoch loop, and worst-group evaluation.

Every trainer (ERM, JTT, DFR, Group DRO) takes manifest rows (original or augmented), a
:class:`~aspire.config.ClassifierConfig` (model factory :func:`~aspire.classifier.build_model` and optimiser
settings) and a seed, and returns a :class:`TrainResult`. Following SpuCo (``robust_train/base_robust_train.py``),
the returned model is the epoch with the best worst-group validation accuracy when the validation rows carry a
``group``, else the best average (worst-class) accuracy.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from aspire.classifier import predict_images, resolve_device, to_tensor
from aspire.config import ClassifierConfig
from aspire.images import load_rgb
from aspire.manifest import Row
from aspire.metrics import group_accuracy

log = logging.getLogger(__name__)

# loss_fn(logits (B, K), labels (B,), row indices (B,)) -> scalar loss; the indices let a method look up groups.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    """What a trainer returns.

    Attributes:
        model: the selected model (best epoch's weights loaded), in eval mode.
        history: one dict per epoch: ``epoch``, ``loss``, ``train_acc``, ``val_avg_acc``,
            ``val_worst_group_acc``, ``val_worst_group`` (val values ``None`` when there are no val rows).
        best_epoch: index into ``history`` of the selected epoch; ``None`` when no epoch was trained here.
        extras: method-specific results (JTT error set, DFR C grid, Group DRO weights, ...).
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int | None
    extras: dict[str, Any] = field(default_factory=dict)


class Trainer(ABC):
    """A robust training method: ``train(train_rows, val_rows, config, seed) -> TrainResult``."""

    @abstractmethod
    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Train on ``train_rows``, select on ``val_rows`` (may be empty: the last epoch is kept)."""


class IndexedRows(Dataset):
    """Manifest rows as (image tensor (3, S, S), label, row index)."""

    def __init__(self, rows: Sequence[Row], image_size: int) -> None:
        self.rows, self.image_size = list(rows), image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        row = self.rows[i]
        return to_tensor(load_rgb(row["path"]), self.image_size), row["label"], i


def check_rows(rows: Sequence[Row], name: str) -> None:
    """Raise a ValueError naming ``name`` when rows are empty or lack ``path``/``label``."""
    if not rows:
        raise ValueError(f"{name}: no rows to train on")
    for column in ("path", "label"):
        missing = [i for i, row in enumerate(rows) if row.get(column) is None]
        if missing:
            raise ValueError(f"{name}: {len(missing)} rows lack column {column!r} (first: row {missing[0]})")


def num_classes(*row_lists: Sequence[Row]) -> int:
    """Number of classes: one more than the largest label in any of the row lists."""
    return 1 + max(int(row["label"]) for rows in row_lists for row in rows)


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


def selection_key(record: dict[str, Any], by_group: bool) -> tuple[float, float]:
    """Worst-group then average val accuracy (by_group), or average accuracy alone."""
    avg = record["val_avg_acc"] or 0.0
    return (record["val_worst_group_acc"] or 0.0, avg) if by_group else (avg, 0.0)


def fit(model: nn.Module, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int,
        loss_fn: LossFn | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        sample_weights: Sequence[float] | None = None) -> tuple[list[dict], int]:
    """Train ``model`` in place for ``config.epochs`` epochs and load the best epoch's weights.

    Data order per epoch comes from a ``torch.Generator`` seeded by (seed, epoch); the global RNG (dropout in
    torchvision models) is forked and seeded, so the caller's random state is untouched. With ``sample_weights``
    (one per train row) an epoch draws ``len(train_rows)`` rows with replacement in proportion to them, instead
    of shuffling.

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
    history: list[dict[str, Any]] = []
    best_epoch, best_state = None, None
    generator = torch.Generator()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for epoch in range(config.epochs):
            generator.manual_seed(seed * 100003 + epoch)
            sampler = None if sample_weights is None else WeightedRandomSampler(
                sample_weights, len(train_rows), replacement=True, generator=generator)
            loader = DataLoader(IndexedRows(train_rows, config.image_size), batch_size=config.batch_size,
                                shuffle=sampler is None, sampler=sampler, num_workers=config.num_workers,
                                generator=generator)
            model.train()
            total, correct, seen = 0.0, 0, 0
            for images, labels, index in loader:
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
            log.info("epoch %d/%d loss %.4f val avg %s worst %s", epoch + 1, config.epochs, record["loss"],
                     record["val_avg_acc"], record["val_worst_group_acc"])
            better = best_epoch is None or selection_key(record, by_group) > selection_key(history[best_epoch], by_group)
            if not val_rows or better:  # no val rows: keep the last epoch
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch
