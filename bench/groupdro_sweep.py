"""Group DRO settings on the demo run's committed rows (no Prefect): worst-group test accuracy per variant.

Usage: python bench/groupdro_sweep.py configs/demo.yaml [original|augmented] [seed]
Prints one line per variant: step size, L2, balanced sampling, groups (labels or phrases), group adjustment,
test avg / worst.
"""

from __future__ import annotations

import sys
import time

from aspire.cache import StageStore
from aspire.config import load_config
from aspire.robust import evaluate, make_trainer
from flows.train import committed
from tasks.export import with_generated_groups
from tasks.retrain import group_rows

VARIANTS = [  # (step_size, l2, balanced, groups, adjustment)
    (0.01, None, False, "labels", 0.0),
    (0.01, None, True, "labels", 0.0),
    (0.01, None, True, "phrases", 0.0),
    (0.01, None, True, "phrases", 2.0),
    (0.01, 0.1, True, "phrases", 0.0),
    (0.01, 1.0, True, "phrases", 0.0),
]


def main(config_path: str, data: str = "original", seed: int = 0) -> None:
    config = load_config(config_path)
    found = committed(config)
    store = StageStore(config.workdir, "train", "sweep")
    for step, l2, balanced, groups, adjustment in VARIANTS:
        rows, info = group_rows(store, found.datasets[data], config.retrain.model_copy(update={"groups": groups}),
                                config.caption, found.spurious, found.captions)
        rows = with_generated_groups(rows)
        train = [r for r in rows if r["split"] == "train"]
        val = [r for r in rows if r["split"] == "val"]
        test = [r for r in found.datasets[data] if r["split"] == "test" and r.get("source") != "generated"]
        start = time.time()
        result = make_trainer("groupdro", step_size=step, l2=l2, balanced=balanced,
                                                          adjustment=adjustment).train(train, val, config.classifier, seed)
        metrics = evaluate(result.model, test, config.classifier)
        print(f"step {step} l2 {l2} balanced {balanced} groups {groups} adjustment {adjustment}: test avg {metrics['avg_acc']:.3f} "
              f"worst {metrics['worst_group_acc']:.3f} ({metrics['worst_group']}), best epoch {result.best_epoch}, "
              f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *(int(s) for s in sys.argv[3:4]))
