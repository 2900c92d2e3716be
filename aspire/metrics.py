"""Average, per-group and worst-group accuracy, the numbers robust-training papers report."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from aspire.manifest import Row


def group_accuracy(rows: Iterable[Row], pred_column: str = "pred") -> dict:
    """Accuracy of ``pred_column`` against ``label``.

    Groups are named ``<group>`` or, when rows carry a ``group_name``, ``<group>:<group_name>``. Rows without
    a ``group`` are grouped by class (``class:<name>``), so worst-group accuracy is still meaningful (worst
    class) when a dataset has no group labels.

    Returns:
        ``{"n", "avg_acc", "worst_group_acc", "worst_group", "per_group": {group: acc}, "group_sizes": {...}}``;
        accuracies are ``None`` when there are no rows.
    """
    hits: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        group = row.get("group")
        if group is None:
            name = f"class:{row['class_name']}"
        else:
            name = f"{group}:{row['group_name']}" if row.get("group_name") else str(group)
        hits[name].append(int(row[pred_column] == row["label"]))
    everything = [h for hs in hits.values() for h in hs]
    per_group = {g: sum(h) / len(h) for g, h in sorted(hits.items(), key=lambda kv: _sort_key(kv[0]))}
    worst = min(per_group, key=per_group.get) if per_group else None
    return {
        "n": len(everything),
        "avg_acc": sum(everything) / len(everything) if everything else None,
        "worst_group_acc": per_group[worst] if worst is not None else None,
        "worst_group": worst,
        "per_group": per_group,
        "group_sizes": {g: len(hits[g]) for g in per_group},
    }


def _sort_key(name: str) -> tuple[int, int | str]:
    head = name.split(":", 1)[0]
    return (0, int(head)) if head.lstrip("-").isdigit() else (1, name)
