"""Robust trainers beside ERM (JTT, DFR, Group DRO, and the human-in-the-loop CLARIFY and SLIM), one file per method
and one interface.

``make_trainer("jtt", identification_epochs=1, upweight=20).train(train_rows, val_rows, config, seed)`` returns a
:class:`TrainResult` whose model is the best epoch on worst-group validation accuracy.
"""

from __future__ import annotations

from aspire.robust.base import Trainer, TrainResult, evaluate
from aspire.robust.clarify import CLARIFYTrainer
from aspire.robust.dfr import DFRTrainer
from aspire.robust.erm import ERMTrainer
from aspire.robust.group_dro import GroupDROTrainer
from aspire.robust.jtt import JTTTrainer, grid_search
from aspire.robust.slim import SLIMTrainer

TRAINERS: dict[str, type[Trainer]] = {
    "erm": ERMTrainer,
    "jtt": JTTTrainer,
    "dfr": DFRTrainer,
    "groupdro": GroupDROTrainer,
    "clarify": CLARIFYTrainer,
    "slim": SLIMTrainer,
}


def make_trainer(method: str, **kwargs) -> Trainer:
    """The trainer called ``method`` (a key of :data:`TRAINERS`), built with ``kwargs``.

    Raises:
        ValueError: unknown method.
    """
    if method not in TRAINERS:
        raise ValueError(f"method={method!r}: not one of {sorted(TRAINERS)}")
    return TRAINERS[method](**kwargs)


__all__ = [
    "TRAINERS",
    "CLARIFYTrainer",
    "DFRTrainer",
    "ERMTrainer",
    "GroupDROTrainer",
    "JTTTrainer",
    "SLIMTrainer",
    "TrainResult",
    "Trainer",
    "evaluate",
    "grid_search",
    "make_trainer",
]
