"""The one interface of the robust trainers; the epoch loop (:func:`~aspire.classifier.fit`) and worst-group
evaluation (:func:`~aspire.classifier.evaluate`) are the classifier module's, shared with the classifier stage.

Every trainer (ERM, JTT, DFR, Group DRO) takes manifest rows (original or augmented), a
:class:`~aspire.config.ClassifierConfig` (model factory :func:`~aspire.classifier.build_model` and optimiser
settings) and a seed, and returns a :class:`TrainResult`. Following SpuCo (``robust_train/base_robust_train.py``),
the returned model is the epoch with the best worst-group validation accuracy when the validation rows carry a
``group``, else the best average (worst-class) accuracy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from aspire.classifier import IndexedRows, evaluate, fit, predict_rows
from aspire.config import ClassifierConfig
from aspire.manifest import Row
from aspire.metrics import selection_key

__all__ = ["IndexedRows", "Trainer", "TrainResult", "check_rows", "evaluate", "fit", "num_classes", "predict_rows",
           "selection_key"]


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


