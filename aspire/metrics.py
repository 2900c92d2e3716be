"""Average, per-group and worst-group accuracy, the numbers robust-training papers report."""

from __future__ import annotations

from collections import defaultdict
from math import comb
from typing import Iterable

from aspire.manifest import Row


def group_name(row: Row) -> str:
    """The group a row is counted in: ``<group>``, ``<group>:<group_name>``, or ``class:<name>`` without a group."""
    group = row.get("group")
    if group is None:
        return f"class:{row['class_name']}"
    return f"{group}:{row['group_name']}" if row.get("group_name") else str(group)


def group_accuracy(rows: Iterable[Row], pred_column: str = "pred", train_rows: Iterable[Row] = ()) -> dict:
    """Accuracy of ``pred_column`` against ``label``.

    Groups are named ``<group>`` or, when rows carry a ``group_name``, ``<group>:<group_name>``. Rows without
    a ``group`` are grouped by class (``class:<name>``), so worst-group accuracy is still meaningful (worst
    class) when a dataset has no group labels.

    ``train_rows`` given: also ``weighted_avg_acc``, the per-group accuracies weighted by the groups' shares of the
    training rows, the "average accuracy" DFR, JTT and ASPIRE report on Waterbirds, whose test groups are balanced
    unlike its training groups (groups absent from the test rows are left out and the weights renormalised).

    Returns:
        ``{"n", "avg_acc", "worst_group_acc", "worst_group", "per_group": {group: acc}, "group_sizes": {...}}``
        (+ ``weighted_avg_acc``); accuracies are ``None`` when there are no rows.
    """
    hits: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        hits[group_name(row)].append(int(row[pred_column] == row["label"]))
    everything = [h for hs in hits.values() for h in hs]
    per_group = {g: sum(h) / len(h) for g, h in sorted(hits.items(), key=lambda kv: _sort_key(kv[0]))}
    worst = min(per_group, key=per_group.get) if per_group else None
    result = {
        "n": len(everything),
        "avg_acc": sum(everything) / len(everything) if everything else None,
        "worst_group_acc": per_group[worst] if worst is not None else None,
        "worst_group": worst,
        "per_group": per_group,
        "group_sizes": {g: len(hits[g]) for g in per_group},
    }
    train_sizes: dict[str, int] = defaultdict(int)
    for row in train_rows:
        train_sizes[group_name(row)] += 1
    shared = {g: n for g, n in train_sizes.items() if g in per_group}
    if shared:
        result["weighted_avg_acc"] = sum(per_group[g] * n for g, n in shared.items()) / sum(shared.values())
    return result


def selection_key(record: dict, by_group: bool) -> tuple[float, float]:
    """Worst-group then average val accuracy (by_group), or average accuracy alone: what picks an epoch, a
    hyper-parameter or a ``generate.per_class`` multiple on validation."""
    avg = record["val_avg_acc"] or 0.0
    return (record["val_worst_group_acc"] or 0.0, avg) if by_group else (avg, 0.0)


def _sort_key(name: str) -> tuple[int, int | str]:
    head = name.split(":", 1)[0]
    return (0, int(head)) if head.lstrip("-").isdigit() else (1, name)


def paired_changes(before: Iterable[Row], after: Iterable[Row], split: str = "test") -> dict[str, list[int]]:
    """Per group of ``split``, the images two models disagree on, paired by ``image_id``: ``{group: [lost,
    gained]}``, lost = right before and wrong after, gained = the reverse (images only one model predicted are
    left out)."""
    right_before = {r["image_id"]: r["pred"] == r["label"] for r in before if r["split"] == split}
    changes: dict[str, list[int]] = {}
    for row in after:
        if row["split"] != split or row["image_id"] not in right_before:
            continue
        lost_gained = changes.setdefault(group_name(row), [0, 0])
        was, now = right_before[row["image_id"]], row["pred"] == row["label"]
        lost_gained[0] += was and not now
        lost_gained[1] += now and not was
    return changes


CONTEXT_KEYS = ("scene", "objects", "place", "spurious")
"""Row keys that say what else an image shows besides its class: the synthetic benchmark's background (``scene``)
and ``objects``, Waterbirds' ``place``, a class/spurious folder tree's ``spurious``. Images of other classes with
the same values share a group's context."""


def lost_images(before: Iterable[Row], after: Iterable[Row], split: str = "test",
                probed: dict[str, list[Row]] | None = None) -> dict[str, dict]:
    """Per group of ``split`` that lost images (right before, wrong after, paired by ``image_id``): ``lost_to``,
    the classes the after model gave them (``{class name: images}``), and, when rows carry any of
    :data:`CONTEXT_KEYS`, ``context``: how often each model gave the group's class to the *other* classes' images
    with the lost images' context (``{"images", "before", "after"}``; None when no other class shows it). A model
    that gave the class to almost every image in that context was right on the group because of the context,
    not the class. ``drawn_to``: the same for the classes the lost images went to, each over the images with the
    context of neither class (the group's nor its own), kept for the one the model after gives most of them
    (``{"class", "of": the group's class, "images", "before", "after"}``; None when no such image exists, as
    with two classes): an after model that gives that class to most of them follows a shortcut from the context
    to it. ``probed``: the two models' predictions (``{"before": rows, "after": rows}``) on other images that
    only count as images of a context (the synthetic benchmark's cue probe, which shows every class beside every
    object and background; :func:`tasks.classifier.probe_cues`)."""
    before_rows = {r["image_id"]: r for r in before if r["split"] == split}
    after_rows = {r["image_id"]: r for r in after if r["split"] == split and r["image_id"] in before_rows}
    names = {r["label"]: r["class_name"] for r in before_rows.values()}
    probed = probed or {}
    before_seen = before_rows | {r["image_id"]: r for r in probed.get("before", ())}
    after_seen = after_rows | {r["image_id"]: r for r in probed.get("after", ()) if r["image_id"] in before_seen}

    def context(row: Row) -> tuple | None:
        found = tuple((k, tuple(sorted(row[k])) if isinstance(row[k], list) else row[k])
                      for k in CONTEXT_KEYS if row.get(k) is not None)
        return found or None

    sharing: dict[tuple, list[str]] = defaultdict(list)  # context: the image ids that show it
    for image_id, row in after_seen.items():
        sharing[context(row)].append(image_id)
    out: dict[str, dict] = {}
    for image_id, now in after_rows.items():
        was = before_rows[image_id]
        if was["pred"] == was["label"] and now["pred"] != now["label"]:
            lost_to = out.setdefault(group_name(now), {"lost_to": {}, "label": now["label"], "context": context(now)})["lost_to"]
            name = names.get(now["pred"], str(now["pred"]))
            lost_to[name] = lost_to.get(name, 0) + 1
    labels = {name: label for label, name in names.items()}

    def given(label: int, peers: list[str]) -> dict | None:
        """How often each model gave ``label`` to ``peers``."""
        return {"images": len(peers), "before": sum(before_seen[i]["pred"] == label for i in peers) / len(peers),
                "after": sum(after_seen[i]["pred"] == label for i in peers) / len(peers)} if peers else None

    for detail in out.values():
        label, where = detail.pop("label"), detail.pop("context")
        detail["lost_to"] = dict(sorted(detail["lost_to"].items(), key=lambda kv: (-kv[1], kv[0])))
        shown = sharing[where] if where is not None else []
        detail["context"] = given(label, [i for i in shown if after_seen[i]["label"] != label])
        drawn = []  # per class the lost images went to (one the split has): the context's images of neither class
        for name in detail["lost_to"]:
            taker = labels.get(name)
            found = None if taker is None else given(
                taker, [i for i in shown if after_seen[i]["label"] not in (label, taker)])
            if found:
                drawn.append({"class": name, "of": names.get(label, str(label)), **found})
        detail["drawn_to"] = max(drawn, key=lambda d: d["after"], default=None)  # ties: the class that took most
    return out


def chance_of_losing(lost: int, gained: int) -> float:
    """McNemar's exact test, one-sided: the chance that a model no worse than the other loses at least ``lost`` of
    the ``lost + gained`` images the two disagree on (each disagreement a fair coin). Small: the group really got
    worse; 8 lost and 0 gained gives 0.004, 3 lost and 0 gained 0.125 (a 20-image group 15 points down)."""
    n = lost + gained
    return sum(comb(n, k) for k in range(lost, n + 1)) / 2**n
