"""Empirical risk minimisation: the baseline every robust method is compared against."""

from __future__ import annotations

from collections.abc import Sequence

from aspire.classifier import build_model
from aspire.config import ClassifierConfig
from aspire.manifest import Row
from aspire.robust.base import Trainer, TrainResult, check_rows, fit, num_classes


class ERMTrainer(Trainer):
    """Plain ERM: cross-entropy, SGD with momentum, the config's lr and weight decay.

    ASPIRE (https://arxiv.org/abs/2308.10103, Sec. 3) trains its ERM models with SGD, lr 1e-3 and weight decay
    1e-4, the :class:`~aspire.config.ClassifierConfig` defaults. The best epoch is chosen on worst-group
    validation accuracy (average accuracy when validation rows have no ``group``).
    """

    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Train a fresh ``build_model(config, K)`` (initialised from ``seed``) with ERM.

        Raises:
            ValueError: no train rows, or rows without ``path``/``label``.
        """
        check_rows(train_rows, "train_rows")
        config = config.model_copy(update={"seed": seed})  # build_model seeds its init from config.seed
        model = build_model(config, num_classes(train_rows, val_rows))
        history, best = fit(model, train_rows, val_rows, config, seed)
        return TrainResult(model, history, best)
