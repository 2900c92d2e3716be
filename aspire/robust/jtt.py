"""Just Train Twice (JTT): upweight the training examples an early-stopped ERM model gets wrong."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from aspire.classifier import build_model
from aspire.config import ClassifierConfig
from aspire.manifest import Row
from aspire.robust.base import (
    Trainer,
    TrainResult,
    check_rows,
    fit,
    num_classes,
    predict_rows,
    selection_key,
)

log = logging.getLogger(__name__)


class JTTTrainer(Trainer):
    """JTT (Liu et al. 2021, https://arxiv.org/abs/2107.09044, Algorithm 1).

    1. Train an identification model with ERM for ``identification_epochs`` (T) epochs (no early stopping), on
       the original training rows only: ASPIRE (App. A.4) adds its generated images (``source == "generated"``)
       to the second stage of two-stage methods, not to the first.
    2. Error set E = the original training rows it misclassifies.
    3. Train the final model with ERM on the whole training set (generated rows included) where every row of E
       appears ``upweight`` (λ_up) times. With λ_up = 1 and no generated rows the training set, its order and the
       seed are those of ERM, so the result is ERM's.

    Args:
        identification_epochs: T, epochs of the identification model.
        upweight: λ_up, how many times each error-set row appears (an integer, as in the paper).
        lr, l2: learning rate and weight decay of both stages, replacing the config's (``None`` keeps them).
    """

    def __init__(self, identification_epochs: int = 1, upweight: int = 20, lr: float | None = None,
                 l2: float | None = None) -> None:
        if identification_epochs < 1:
            raise ValueError(f"identification_epochs={identification_epochs}: must be >= 1")
        if int(upweight) != upweight or upweight < 1:
            raise ValueError(f"upweight={upweight}: must be an integer >= 1")
        self.identification_epochs, self.upweight = identification_epochs, int(upweight)
        self.updates = {k: v for k, v in (("lr", lr), ("weight_decay", l2)) if v is not None}

    def identify(self, train_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> tuple[nn.Module, list[Row]]:
        """Steps 1-2: the identification model (trained on the original rows) and the original rows it gets wrong."""
        originals = [row for row in train_rows if row.get("source") != "generated"]
        config = config.model_copy(update={**self.updates, "seed": seed, "epochs": self.identification_epochs})
        model = build_model(config, num_classes(train_rows))
        fit(model, originals, [], config, seed)  # no val rows: the model after exactly T epochs
        preds = predict_rows(model, originals, config)
        errors = [row for row, pred in zip(originals, preds) if pred != row["label"]]
        log.info("JTT: T=%d, error set %d of %d original training rows (%d generated rows join stage 2 only)",
                 self.identification_epochs, len(errors), len(originals), len(train_rows) - len(originals))
        return model, errors

    def train_upweighted(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig,
                         seed: int, errors: Sequence[Row]) -> TrainResult:
        """Step 3: ERM on the training rows with the error set repeated λ_up times."""
        upsampled = list(train_rows) + [row for row in errors for _ in range(self.upweight - 1)]
        config = config.model_copy(update={**self.updates, "seed": seed})
        model = build_model(config, num_classes(train_rows, val_rows))
        history, best = fit(model, upsampled, val_rows, config, seed)
        error_ids = [row["image_id"] for row in errors]
        return TrainResult(model, history, best, {"error_set": error_ids, "n_train_rows": len(upsampled),
                                                  "identification_epochs": self.identification_epochs, "upweight": self.upweight})

    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Run Algorithm 1; ``extras["error_set"]`` holds the image ids of the error set.

        Raises:
            ValueError: no train rows, or rows without ``path``/``label``.
        """
        check_rows(train_rows, "train_rows")
        _, errors = self.identify(train_rows, config, seed)
        return self.train_upweighted(train_rows, val_rows, config, seed, errors)


def grid_search(train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int,
                Ts: Sequence[int], lambdas: Sequence[int]) -> tuple[TrainResult, list[dict]]:
    """JTT for every (T, λ_up) pair; keep the one with the best worst-group validation accuracy.

    The identification model is trained once per T and shared by all λ_up.

    Returns:
        (the best result, one ``{"T", "upweight", "error_set_size", "val_avg_acc", "val_worst_group_acc"}``
        per pair, in grid order).

    Raises:
        ValueError: empty ``Ts``, ``lambdas`` or ``val_rows`` (nothing to select on).
    """
    if not Ts or not lambdas:
        raise ValueError(f"Ts={list(Ts)}, lambdas={list(lambdas)}: both need at least one value")
    if not val_rows:
        raise ValueError("val_rows: the grid search selects on validation accuracy and got no rows")
    check_rows(train_rows, "train_rows")
    by_group = all(row.get("group") is not None for row in val_rows)
    best, table = None, []
    for T in Ts:
        errors = JTTTrainer(T, 1).identify(train_rows, config, seed)[1]
        for lam in lambdas:
            result = JTTTrainer(T, lam).train_upweighted(train_rows, val_rows, config, seed, errors)
            chosen = result.history[result.best_epoch]
            table.append({"T": T, "upweight": lam, "error_set_size": len(errors), "val_avg_acc": chosen["val_avg_acc"],
                          "val_worst_group_acc": chosen["val_worst_group_acc"]})
            if best is None or selection_key(chosen, by_group) > selection_key(best.history[best.best_epoch], by_group):
                best = result
    return best, table
