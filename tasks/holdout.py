"""Stage ``holdout`` (second half of ASPIRE step 1): keep p% of the correctly classified training images.

ASPIRE Sec. 2(1) (https://arxiv.org/abs/2308.10103): "we first identify training examples that are
correctly classified by a standard ERM model and then randomly select p% of them". The classifier's
val/test predictions give the report's ``before`` block.

Column added: ``holdout`` (bool).
"""

from __future__ import annotations

import numpy as np

from aspire.config import HoldoutConfig
from aspire.manifest import Row
from aspire.metrics import group_accuracy

STAGE = "holdout"
VERSION = 1


def select_holdout(rows: list[Row], config: HoldoutConfig) -> list[Row]:
    """Mark ``holdout=True`` on round(p * n) of the n correctly classified train rows, sampled with the seed.

    The sample depends only on the seed and the set of candidate image ids, not on row order or sharding.
    """
    candidates = sorted(r["image_id"] for r in rows if r["split"] == "train" and r["correct"])
    n_keep = min(len(candidates), max(1, round(config.fraction * len(candidates)))) if candidates else 0
    rng = np.random.default_rng(config.seed)
    keep = {candidates[i] for i in rng.permutation(len(candidates))[:n_keep].tolist()}
    return [{**r, "holdout": r["image_id"] in keep} for r in rows]


def evaluate(rows: list[Row], train_rows: list[Row] | None = None) -> dict:
    """Accuracy (average, per group, worst group, and the average weighted by the training groups' shares) of the
    ``pred`` column on the val and test splits; the training rows are ``rows``' own unless given (generated rows
    never count: the weights are the dataset's)."""
    train = [r for r in (rows if train_rows is None else train_rows)
             if r["split"] == "train" and r.get("source") != "generated"]
    result = {}
    for split in ("val", "test"):
        split_rows = [r for r in rows if r["split"] == split]
        if split_rows:
            result[split] = group_accuracy(split_rows, train_rows=train)
    return result
