from aspire.metrics import group_accuracy


def row(label, pred, group=None, name="c"):
    return {"label": label, "pred": pred, "group": group, "class_name": name}


def test_group_accuracy_reports_worst_group():
    rows = [row(0, 0, 0), row(0, 0, 0), row(1, 0, 1), row(1, 1, 1), row(1, 0, 2)]
    result = group_accuracy(rows)
    assert result["avg_acc"] == 3 / 5
    assert result["per_group"] == {"0": 1.0, "1": 0.5, "2": 0.0}
    assert (result["worst_group"], result["worst_group_acc"]) == ("2", 0.0)


def test_rows_without_groups_fall_back_to_classes():
    result = group_accuracy([row(0, 0, name="cat"), row(1, 0, name="dog")])
    assert result["per_group"] == {"class:cat": 1.0, "class:dog": 0.0}


def test_empty():
    assert group_accuracy([])["avg_acc"] is None
