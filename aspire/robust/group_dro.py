"""Group DRO: minimise the worst group's loss with online, exponentiated-gradient group weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from aspire.classifier import build_model
from aspire.config import ClassifierConfig
from aspire.manifest import Row
from aspire.robust.base import Trainer, TrainResult, check_rows, fit, num_classes

log = logging.getLogger(__name__)


def dro_update(q: torch.Tensor, group_losses: torch.Tensor, step_size: float) -> torch.Tensor:
    """One exponentiated-gradient step on the simplex: q_g <- q_g exp(η loss_g), renormalised."""
    q = q * torch.exp(step_size * group_losses.detach())
    return q / q.sum()


class GroupDROLoss:
    """The online Group DRO objective over G groups; ``q`` is the current group weight vector (sums to 1).

    Args:
        row_groups: group index 0..G-1 of every training row, (N,) long.
        n_groups: G.
        step_size: η of the q update.
        adjustment: C of the paper's group adjustment (Sec. 3.3): the q update sees loss_g + C / sqrt(n_g), so
            small groups, whose training loss underestimates their test loss, weigh more (0: none).
    """

    def __init__(self, row_groups: torch.Tensor, n_groups: int, step_size: float, adjustment: float = 0.0) -> None:
        self.row_groups, self.n_groups, self.step_size = row_groups, n_groups, step_size
        sizes = torch.bincount(row_groups, minlength=n_groups).float().clamp(min=1)
        self.bonus = adjustment / sizes.sqrt()  # (G,)
        self.q = torch.full((n_groups,), 1.0 / n_groups)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")  # (B,)
        groups = self.row_groups[index].to(logits.device)  # (B,)
        one_hot = nn.functional.one_hot(groups, self.n_groups).float()  # (B, G)
        counts = one_hot.sum(0)
        group_losses = (one_hot * losses[:, None]).sum(0) / counts.clamp(min=1)  # (G,), 0 for absent groups
        present = (counts > 0).float()  # absent groups get no adjustment either: no evidence this batch
        adjusted = group_losses + present * self.bonus.to(logits.device)
        self.q = dro_update(self.q.to(logits.device), adjusted, self.step_size)
        return group_losses @ self.q


class GroupDROTrainer(Trainer):
    """Online Group DRO (Sagawa et al. 2020, https://arxiv.org/abs/1911.08731, Algorithm 1).

    Each batch: per-group mean losses loss_g, q_g <- q_g exp(η loss_g) renormalised, loss = Σ_g q_g loss_g.
    The paper pairs it with strong L2 regularisation (weight decay up to 1.0), given here as ``l2``, and its
    code samples groups uniformly (``--reweight_groups``, used in its Group DRO runs), given here as ``balanced``:
    without it a minority group of a few rows is absent from most batches and its weight hardly moves.

    Args:
        step_size: η (the paper's 0.01).
        l2: weight decay replacing ``config.weight_decay``; ``None`` keeps the config's.
        balanced: draw every group equally often (row weight 1 / its group's size).
        adjustment: the group adjustment C (see :class:`GroupDROLoss`).
        lr: learning rate replacing ``config.lr``; ``None`` keeps the config's.
    """

    def __init__(self, step_size: float = 0.01, l2: float | None = None, balanced: bool = True,
                 adjustment: float = 0.0, lr: float | None = None) -> None:
        if step_size <= 0:
            raise ValueError(f"step_size={step_size}: must be > 0")
        if l2 is not None and l2 < 0:
            raise ValueError(f"l2={l2}: must be >= 0 or None")
        if adjustment < 0:
            raise ValueError(f"adjustment={adjustment}: must be >= 0")
        self.step_size, self.l2, self.balanced, self.adjustment, self.lr = step_size, l2, balanced, adjustment, lr

    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Train with the Group DRO loss; ``extras["q"]`` maps each train group to its final weight and
        every history record has the weights at the end of its epoch.

        Raises:
            ValueError: no train rows, malformed rows, or train rows without a ``group``.
        """
        check_rows(train_rows, "train_rows")
        missing = [row.get("image_id", i) for i, row in enumerate(train_rows) if row.get("group") is None]
        if missing:
            raise ValueError(f"train_rows: Group DRO needs column 'group' on every row; {len(missing)} rows lack it "
                             f"(first: {missing[0]!r}). Label groups first (e.g. from the ASPIRE run's phrases).")
        names = sorted({row["group"] for row in train_rows}, key=lambda g: (str(type(g)), g))
        position = {g: i for i, g in enumerate(names)}
        row_groups = torch.tensor([position[row["group"]] for row in train_rows])
        loss = GroupDROLoss(row_groups, len(names), self.step_size, self.adjustment)
        sizes = torch.bincount(row_groups, minlength=len(names)).double()
        weights = (1.0 / sizes[row_groups]).tolist() if self.balanced else None
        updates = {"seed": seed, **({} if self.l2 is None else {"weight_decay": self.l2}),
                   **({} if self.lr is None else {"lr": self.lr})}
        config = config.model_copy(update=updates)
        model = build_model(config, num_classes(train_rows, val_rows))

        def record_q(record: dict) -> None:
            record["q"] = {g: float(w) for g, w in zip(names, loss.q.cpu())}

        history, best = fit(model, train_rows, val_rows, config, seed, loss_fn=loss, on_epoch=record_q,
                             sample_weights=weights)
        log.info("Group DRO: final q %s", history[-1]["q"])
        return TrainResult(model, history, best, {"q": history[-1]["q"], "groups": names})
