"""Deep Feature Reweighting (DFR): retrain only the last layer of an ERM model on group-balanced held-out data."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from torch import nn
from torch.utils.data import DataLoader

from aspire.classifier import load_model, resolve_device
from aspire.config import ClassifierConfig
from aspire.manifest import Row
from aspire.robust.base import (
    IndexedRows,
    Trainer,
    TrainResult,
    check_rows,
    num_classes,
)
from aspire.robust.erm import ERMTrainer

log = logging.getLogger(__name__)


class DFRTrainer(Trainer):
    """DFR (Kirichenko et al. 2022, https://arxiv.org/abs/2204.02937, Sec. 5 and Appendix B "DFR^Val_Tr").

    1. Take an ERM model (``base_model``, the one saved at ``base_model_path`` (e.g. the run's classifier
       stage), or train one with :class:`ERMTrainer`); its backbone is frozen.
    2. Embed the head rows with the backbone (the model without its final linear layer): the validation rows,
       plus the generated train rows (``source == "generated"``) when ``generated_in_head``: ASPIRE adds its
       augmentations to the set a 2-stage method uses in its second stage (App. A.4).
    3. Tune C: split validation in half per group; fit a logistic regression for every C on a group-balanced
       subset of the first half (features standardised with the tuning rows' mean and std) and keep the C with
       the best worst-group accuracy on the second half. ``penalty``: l1 (liblinear, one-vs-rest: DFR's recipe
       for Waterbirds and CelebA) or l2 (lbfgs, softmax: the ImageNet-9 recipe the Corner Cases paper uses, with
       a single C = 1/lambda, lambda = 100). A grid of one C skips the tuning.
    4. Refit with that C on ``n_refits`` group-balanced subsets of all validation rows; the head is the average
       of their coefficients. Rows without ``group`` are balanced by class instead.

    Args:
        base_model: a trained classifier whose last layer is ``fc``/``head``/``heads``/``classifier``.
        c_grid: inverse penalty strengths to try (DFR's grid).
        penalty: ``l1`` or ``l2``.
        n_refits: balanced subsamples averaged into the final head.
        base_model_path: a model saved by :func:`aspire.classifier.save_model`, used when ``base_model`` is None.
        generated_in_head: fit the head on the generated train rows too.
    """

    def __init__(self, base_model: nn.Module | None = None, c_grid: Sequence[float] = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01),
                 n_refits: int = 10, base_model_path: str | None = None, generated_in_head: bool = True,
                 penalty: str = "l1") -> None:
        if not c_grid or min(c_grid) <= 0:
            raise ValueError(f"c_grid={list(c_grid)}: need at least one C, all > 0")
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty={penalty!r}: must be l1 or l2")
        if n_refits < 1:
            raise ValueError(f"n_refits={n_refits}: must be >= 1")
        if base_model is None and base_model_path is not None:
            base_model = load_model(Path(base_model_path))[0]
        self.base_model, self.c_grid, self.n_refits = base_model, tuple(c_grid), n_refits
        self.generated_in_head, self.penalty = generated_in_head, penalty

    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Return backbone + new head; ``extras`` holds the C table, the best C and the refit subsets' image ids.

        Raises:
            ValueError: no validation rows (the head is fitted on them), or malformed rows.
        """
        # 1. The frozen backbone, from the given or a freshly trained ERM model.
        check_rows(val_rows, "val_rows")
        history, best_epoch, base = [], None, self.base_model
        if base is None:  # stage 1 on the original rows: ASPIRE adds its images to the second stage (App. A.4)
            originals = [row for row in train_rows if row.get("source") != "generated"]
            erm = ERMTrainer().train(originals, val_rows, config, seed)
            history, best_epoch, base = erm.history, erm.best_epoch, erm.model
        backbone = strip_head(base)
        # 2. Embeddings, labels and balancing groups of the head rows.
        if self.generated_in_head:
            val_rows = [*val_rows, *(r for r in train_rows if r.get("source") == "generated")]
        x = embed(backbone, val_rows, config)  # (N, D)
        y = np.array([row["label"] for row in val_rows])
        groups = np.array([str(row["group"]) if row.get("group") is not None else f"class:{row['label']}" for row in val_rows])
        k, rng = num_classes(val_rows, train_rows), np.random.default_rng(seed)
        # 3. Tune C on a per-group half split.
        tune, held = half_split(groups, rng)
        mean, std = x[tune].mean(0), x[tune].std(0) + 1e-8
        table = []
        # one C, or one validation row per group: nothing to tune
        for c in self.c_grid if len(held) and len(self.c_grid) > 1 else []:
            subset = tune[balanced_subset(groups[tune], rng)]
            w, b = fit_linear((x[subset] - mean) / std, y[subset], c, k, seed, self.penalty)
            pred = (((x[held] - mean) / std) @ w.T + b).argmax(1)
            table.append({"C": c, "val_worst_group_acc": worst_group(pred == y[held], groups[held])})
        # first of equals: the weakest penalty (also when C could not be tuned)
        best_c = max(table, key=lambda r: r["val_worst_group_acc"])["C"] if table else self.c_grid[0]
        # 4. Refit on balanced subsets of all validation rows and average.
        mean, std = x.mean(0), x.std(0) + 1e-8
        fits, subsets = [], []
        for i in range(self.n_refits):
            subset = balanced_subset(groups, rng)
            subsets.append([val_rows[j]["image_id"] for j in subset])
            fits.append(fit_linear((x[subset] - mean) / std, y[subset], best_c, k, seed + i, self.penalty))
        head = linear_head(np.mean([f[0] for f in fits], 0), np.mean([f[1] for f in fits], 0), mean, std)
        log.info("DFR: %s, C=%s, %d refits on %d balanced rows each", self.penalty, best_c, self.n_refits, len(subsets[0]))
        model = nn.Sequential(backbone, head).eval()
        return TrainResult(model, history, best_epoch, {"c_table": table, "best_c": best_c, "refit_subsets": subsets})


def strip_head(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` whose final linear layer is ``nn.Identity``: it returns penultimate features."""
    backbone = copy.deepcopy(model)
    for name in ("fc", "head", "heads", "classifier"):
        owner = getattr(backbone, name, None)
        if isinstance(owner, nn.Linear):
            setattr(backbone, name, nn.Identity())
            break
        if isinstance(owner, nn.Sequential) and any(isinstance(m, nn.Linear) for m in owner):
            last = max(i for i, m in enumerate(owner) if isinstance(m, nn.Linear))
            owner[last] = nn.Identity()
            break
    else:
        raise ValueError(f"base_model={type(model).__name__}: found no final linear layer (fc/head/heads/classifier)")
    backbone.requires_grad_(False)
    return backbone.eval()


@torch.no_grad()
def embed(backbone: nn.Module, rows: Sequence[Row], config: ClassifierConfig) -> np.ndarray:
    """Penultimate features of ``rows``, (N, D) float64."""
    device = resolve_device(config.device)
    backbone.to(device).eval()
    loader = DataLoader(IndexedRows(rows, config.image_size), batch_size=config.batch_size, num_workers=config.num_workers)
    return torch.cat([backbone(images.to(device)).cpu() for images, _, _ in loader]).double().numpy()


def half_split(groups: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two halves, each group split in two (the odd row goes to the first half)."""
    first, second = [], []
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        cut = (len(idx) + 1) // 2
        first += idx[:cut].tolist()
        second += idx[cut:].tolist()
    return np.sort(np.array(first, dtype=int)), np.sort(np.array(second, dtype=int))


def balanced_subset(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random subset with as many rows of every group as the smallest group has."""
    names = np.unique(groups)
    n = min(int((groups == g).sum()) for g in names)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(groups == g), n, replace=False) for g in names]))


def fit_linear(x: np.ndarray, y: np.ndarray, c: float, k: int, seed: int, penalty: str = "l1") -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression, weights (K, D) and biases (K,) over all K classes: L1 (liblinear, one-vs-rest) or
    L2 (lbfgs, softmax over the K classes)."""
    if set(np.unique(y)) != set(range(k)):
        raise ValueError(f"DFR: the balanced subset has classes {sorted(set(y.tolist()))}, need all of 0..{k - 1}")
    if penalty == "l2":
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)
        return per_class_logits(clf.coef_, clf.intercept_, k)
    clf = OneVsRestClassifier(LogisticRegression(l1_ratio=1.0, solver="liblinear", C=c, random_state=seed)).fit(x, y)
    w = np.concatenate([e.coef_ for e in clf.estimators_])  # (K, D), or (1, D) for two classes
    b = np.concatenate([e.intercept_ for e in clf.estimators_])
    return per_class_logits(w, b, k)


def per_class_logits(w: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) weights and (K,) biases from a scikit-learn linear model's, which has one logit z for two classes:
    softmax([-z/2, z/2]) = sigmoid(z)."""
    if k == 2 and w.shape[0] == 1:
        return np.stack([-w[0] / 2, w[0] / 2]), np.array([-b[0] / 2, b[0] / 2])
    return w, b


def linear_head(w: np.ndarray, b: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> nn.Linear:
    """An ``nn.Linear`` computing ``w (x - mean) / std + b``: a head fitted on standardised features, folded."""
    if mean is not None and std is not None:
        w, b = w / std, b - (w / std) @ mean
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w).float())
        head.bias.copy_(torch.from_numpy(b).float())
    return head


def worst_group(hits: np.ndarray, groups: np.ndarray) -> float:
    """Lowest per-group mean of ``hits``."""
    return min(float(hits[groups == g].mean()) for g in np.unique(groups))
