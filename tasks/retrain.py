"""Stage ``retrain`` (ASPIRE step 6): retrain the classifier on the augmented set, evaluate on val/test.

ASPIRE Sec. 2(6) (https://arxiv.org/abs/2308.10103). The classifier settings are the ``classifier``
section's (``retrain.epochs`` may override the epochs); training and prediction reuse the classifier
stage's tasks, so the model is a committed part and predictions are shards salted with its digest.
"""

from __future__ import annotations

from aspire.config import ClassifierConfig, RetrainConfig

STAGE = "retrain"
VERSION = 1


def retrain_config(classifier: ClassifierConfig, retrain: RetrainConfig) -> ClassifierConfig:
    """The classifier config used to retrain."""
    return classifier.model_copy(update={"epochs": retrain.epochs or classifier.epochs})
